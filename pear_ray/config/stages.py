"""The stages' settings: score, SFT (PEAR), RL, eval."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pear_ray.config.base import Section
from pear_ray.config.optimizer import RlOptimizer, SftOptimizer, TeacherOptimizer
from pear_ray.objectives import PEAR_LEVELS, Grpo, PearSft, RlObjective

VARIANT_MODIFIERS = ("distill", "opd")


class ScoreConfig(Section):
    """Bringing SFT data to behaviour log-probs (and, with `teacher_topk`, the teacher's top-k). Without `data.sft`,
    the behaviour model writes the data from the task's train prompts (recording its log-probs as it samples), after
    `teacher_sft_steps` of canonical SFT on the task's gold answers (a briefly trained teacher, off the student's
    distribution)."""

    batch_size: int = Field(64, gt=0)
    samples_per_prompt: int = Field(1, ge=1)
    keep: Literal["all", "correct"] = "all"
    teacher_sft_steps: int = Field(0, ge=0)
    teacher_optimizer: TeacherOptimizer = Field(default_factory=TeacherOptimizer, description="the teacher's "
                                                "brief SFT (teacher_sft_steps steps of sft.batch_size rows)")
    teacher_data: str | None = Field(None, description="what the teacher is trained on: a Parquet/JSONL file of "
                                     "prompt + response texts (e.g. worked traces); default the task's gold answers")
    teacher_topk: int = Field(0, ge=0, description="> 0: data/sft.parquet also carries the behaviour model's k most "
                              "likely next tokens at every response token (column teacher_topk), for a distillation "
                              "loss; recorded as it samples or scores, exact for a scripted policy. 0: none")


def parse_variant(label: str) -> tuple[str, set[str]]:
    """(PEAR level, modifiers) of a variant label `level[+distill][+opd]`: `distill` makes the SFT base loss the
    teacher's top-k KL instead of the NLL, `opd` makes the RL objective on-policy distillation instead of rl.objective
    (e.g. `token+distill`, `none+opd`)."""
    level, *modifiers = str(label).split("+")
    if level not in PEAR_LEVELS or any(m not in VARIANT_MODIFIERS for m in modifiers) or \
            len(set(modifiers)) != len(modifiers):
        raise ValueError(f"variant {label!r} is not a PEAR level {PEAR_LEVELS} followed by any of "
                         f"{['+' + m for m in VARIANT_MODIFIERS]}, e.g. 'token' or 'token+distill'")
    return level, set(modifiers)


class SftConfig(Section):
    pear: PearSft = Field(default_factory=PearSft)
    # Comparison mode: several variants trained from the same student on the same data, each then through RL.
    variants: list[str] = Field(default_factory=list, description="labels level[+distill][+opd], see parse_variant")
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(16, gt=0)
    optimizer: SftOptimizer = Field(default_factory=SftOptimizer, description="every variant's AdamW and schedule")
    checkpoint_every: int = Field(50, gt=0)

    @field_validator("variants")
    @classmethod
    def _labels(cls, variants: list[str]) -> list[str]:
        for label in variants:
            parse_variant(label)
        return variants


class RlConfig(Section):
    steps: int = Field(10, ge=1)
    prompts_per_step: int = Field(8, gt=0)
    group_size: int = Field(8, ge=2)
    optimizer: RlOptimizer = Field(default_factory=RlOptimizer, description="the RL learner's AdamW and schedule")
    objective: RlObjective = Field(default_factory=Grpo, description="grpo (default), on_policy_distill or a "
                                   "custom plug-in (kind: custom, function: module:function)")
    normalize_std: bool = Field(True, description="group advantages divided by the group's reward std (GRPO)")
    drop_constant_groups: bool = Field(True, description="drop groups whose rewards are all equal (no signal), "
                                       "when the objective reads the advantage")
    checkpoint_every: int = Field(5, gt=0)
    max_staleness: int = Field(0, ge=0, description="k: the rollout actors generate the next k steps' samples "
                               "while the learner trains, with weights at most k updates old (the truncated "
                               "importance correction against their rollout log-probs corrects for it); older "
                               "samples are counted and regenerated. The pipeline starts afresh at every "
                               "checkpoint, so a resumed run is the uninterrupted one. 0: generate, then train")
    fill_batch: bool = Field(False, description="with drop_constant_groups: draw more prompts until the step has "
                             "prompts_per_step groups whose rewards differ, or fill_max_extra_prompts are drawn "
                             "(DAPO's dynamic sampling)")
    fill_max_extra_prompts: int = Field(64, ge=0, description="fill_batch: the most extra prompts a step draws")
    save_rollouts: bool = Field(False, description="write every step's samples (ids, tokens, reward, advantage, "
                                "policy version, whether trained) to rollouts/rl-<variant>/step-<n>.parquet")


class EvalConfig(Section):
    n: int = Field(8, ge=1)
    correct_threshold: float = Field(1.0, gt=0, le=1, description="a sample counts as correct at this reward")
    k: list[int] = Field(default_factory=lambda: [1, 8])
    temperature: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _k_within_n(self) -> EvalConfig:
        too_big = [k for k in self.k if k > self.n or k < 1]
        if too_big:
            raise ValueError(f"every k must be in 1..n={self.n}; got {too_big}")
        return self
