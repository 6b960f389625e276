"""One optimizer section for every model a job trains (the student's prior, the teacher, SFT, RL): AdamW with the
learner's gradient clipping and learning-rate schedule. Each place has its own defaults (a subclass), so a partial
section such as `sft.optimizer: {lr: 1e-3}` keeps that place's schedule."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pear_ray.config.base import Section

Schedule = Literal["constant", "cosine", "linear"]


class OptimizerConfig(Section):
    """AdamW (torch's, as DeepSpeed's client optimizer) and the learning-rate schedule of one training."""

    lr: float = Field(1e-5, gt=0, description="peak learning rate")
    lr_schedule: Schedule = Field("constant", description="after warmup: constant, or cosine / linear decay to 0 at "
                                  "the training's last step")
    warmup_steps: int = Field(0, ge=0, description="steps of linear warmup from 0 to lr")
    grad_clip: float = Field(1.0, gt=0, description="the global gradient norm is clipped to this before each update")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay")


class SftOptimizer(OptimizerConfig):
    """SFT's defaults: the paper's math learning rate, cosine decay."""

    lr: float = Field(1e-5, gt=0, description="peak learning rate (the paper: 1e-5 for math, 3e-5 for logic games)")
    lr_schedule: Schedule = Field("cosine", description="after warmup: constant, or cosine / linear decay to 0 at "
                                  "the last SFT step")


class RlOptimizer(OptimizerConfig):
    """RL's defaults: a small constant learning rate."""

    lr: float = Field(1e-6, gt=0, description="learning rate (constant unless lr_schedule says otherwise)")


class PriorOptimizer(OptimizerConfig):
    """A tiny student's prior: a fresh model learns the format fast at a high constant rate."""

    lr: float = Field(3e-3, gt=0, description="learning rate of the prior's canonical SFT")


class TeacherOptimizer(OptimizerConfig):
    """The behaviour model's brief SFT before it writes the data (score.teacher_sft_steps)."""

    lr: float = Field(1e-3, gt=0, description="learning rate of the teacher's canonical SFT")
