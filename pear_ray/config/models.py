"""The models a job names: the student, the behaviour policy (a model or a scripted policy), the reference."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pear_ray.config.base import Section
from pear_ray.config.optimizer import PriorOptimizer
from pear_ray.models.tiny import TinyModelSpec


class ScriptedPolicy(Section):
    """A behaviour policy written as code, so its log-probs are exact: `two_style` writes, per prompt, a worked
    trace with probability `p_trace` or the bare answer otherwise (pear_ray/tasks/addition.py)."""

    name: Literal["two_style"] = "two_style"
    p_trace: float = Field(0.5, ge=0, le=1)


class PriorConfig(Section):
    """Canonical SFT of a tiny model on a scripted policy's responses before the job uses it: the prior that
    pre-training gives a real model. Its prompts follow the task's train split (disjoint from train and eval)."""

    policy: ScriptedPolicy
    steps: int = Field(gt=0)
    optimizer: PriorOptimizer = Field(default_factory=PriorOptimizer, description="the prior's AdamW and schedule")
    batch_size: int = Field(32, gt=0)
    num_prompts: int = Field(2048, gt=0)


class ModelSource(Section):
    """A Hugging Face model folder or Hub id, a tiny model built on the spot from a spec (no downloads here),
    optionally given a prior, or (behaviour only) a scripted policy."""

    path: str | None = Field(None, description="a model folder, or a Hub id ('org/name') fetched into the Hub cache "
                             "(HF_HOME / HF_HUB_CACHE; only the cache with HF_HUB_OFFLINE=1); a folder wins")
    revision: str | None = Field(None, min_length=1, description="a Hub id's branch, tag or commit; default main")
    tiny: TinyModelSpec | None = None
    scripted: ScriptedPolicy | None = None
    prior: PriorConfig | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        if sum(source is not None for source in (self.path, self.tiny, self.scripted)) != 1:
            raise ValueError("give exactly one of 'path' (a model folder), 'tiny' (a spec to build) or 'scripted' "
                             "(a behaviour policy written as code)")
        if self.prior is not None and self.tiny is None:
            raise ValueError("'prior' trains a tiny model built on the spot: give it with 'tiny'")
        if self.revision is not None and self.path is None:
            raise ValueError("'revision' pins a Hub id: give it with 'path'")
        return self


class ModelsConfig(Section):
    student: ModelSource
    # The policy that wrote the SFT data; absent when the data already carries behaviour log-probs.
    behavior: ModelSource | None = None
    # Frozen model for the RL KL term and PEAR's frozen target; defaults to RL's start model (the SFT checkpoint)
    # and to the student before SFT respectively.
    reference: ModelSource | None = None
