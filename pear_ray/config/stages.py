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

    batch_size: int = Field(64, gt=0, description="rows per scoring request when the behaviour model scores "
                            "data.sft (the row groups streamed through the scoring pool)")
    samples_per_prompt: int = Field(1, ge=1, description="responses per train prompt when the behaviour policy "
                                    "(a model or scripted) writes the data")
    keep: Literal["all", "correct"] = Field("all", description="which responses a behaviour model that writes the "
                                            "data keeps: all, or those whose reward reaches eval.correct_threshold")
    teacher_sft_steps: int = Field(0, ge=0, description="optimizer steps of canonical SFT (sft.batch_size rows each) "
                                   "that the behaviour model gets on the task's gold answers, or score.teacher_data, "
                                   "before it writes the data; 0: it writes as it is")
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
    """PEAR-weighted SFT of the student on the scored data: one variant, or several to compare."""

    pear: PearSft = Field(default_factory=PearSft, description="the SFT objective; sft.variants' labels set its "
                          "level and base loss per variant")
    variants: list[str] = Field(default_factory=list, description="comparison mode: variants trained from the same "
                                "student on the same data, each then through RL and eval, labelled "
                                "level[+distill][+opd] (e.g. none, token, block+distill): +distill trains on the "
                                "teacher's top-k, +opd makes the variant's RL on-policy distillation. Empty: the one "
                                "variant sft.pear describes")
    epochs: int = Field(1, ge=1, description="passes over the SFT data, each in a fresh order drawn from the seed")
    batch_size: int = Field(16, gt=0, description="rows per optimizer step (the teacher's SFT uses it too)")
    optimizer: SftOptimizer = Field(default_factory=SftOptimizer, description="every variant's AdamW and schedule")
    checkpoint_every: int = Field(50, gt=0, description="steps between checkpoints, from which a stopped run resumes; "
                                  "also the prior's and the teacher's SFT")

    @field_validator("variants")
    @classmethod
    def _labels(cls, variants: list[str]) -> list[str]:
        for label in variants:
            parse_variant(label)
        return variants


class RlConfig(Section):
    """RL of each variant from its SFT export (the student when the job has no sft stage)."""

    steps: int = Field(10, ge=1, description="RL steps per variant; a step samples one batch and makes the "
                       "objective's updates on it (rl.objective.minibatches x epochs_per_batch)")
    prompts_per_step: int = Field(8, gt=0, description="train prompts a step samples, drawn from (seed, step)")
    group_size: int = Field(8, ge=2, description="samples per prompt: a group, whose rewards give each sample its "
                            "advantage (one sample alone has none)")
    optimizer: RlOptimizer = Field(default_factory=RlOptimizer, description="the RL learner's AdamW and schedule")
    objective: RlObjective = Field(default_factory=Grpo, description="grpo (default), on_policy_distill or a "
                                   "custom plug-in (kind: custom, function: module:function)")
    normalize_std: bool = Field(True, description="group advantages divided by the group's reward std (GRPO); "
                                "false: only centred on the group's mean (Dr. GRPO)")
    drop_constant_groups: bool = Field(True, description="drop groups whose rewards are all equal (no signal), "
                                       "when the objective reads the advantage")
    checkpoint_every: int = Field(5, gt=0, description="steps between checkpoints, from which a stopped run resumes")
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
    """pass@k on the task's held-out prompts, after SFT and after RL, estimated without bias from n samples each."""

    n: int = Field(8, ge=1, description="samples per held-out prompt")
    correct_threshold: float = Field(1.0, gt=0, le=1, description="a sample counts as correct at this reward")
    k: list[int] = Field(default_factory=lambda: [1, 8], description="the k of each pass@k reported, each in 1..n")
    temperature: float = Field(1.0, ge=0, description="eval's sampling temperature (0: greedy); the rest of its "
                               "sampling is the sampling section's")

    @model_validator(mode="after")
    def _k_within_n(self) -> EvalConfig:
        too_big = [k for k in self.k if k > self.n or k < 1]
        if too_big:
            raise ValueError(f"every k must be in 1..n={self.n}; got {too_big}")
        return self
