"""The whole job: its sections, and the rules that span several of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pear_ray.config.base import Section
from pear_ray.config.data import DataConfig, SamplingConfig, TaskConfig
from pear_ray.config.models import ModelsConfig
from pear_ray.config.resources import ResourcesConfig
from pear_ray.config.stages import EvalConfig, RlConfig, ScoreConfig, SftConfig, parse_variant
from pear_ray.objectives import Grpo, OnPolicyDistill, PearSft, RlObjective

Stage = Literal["score", "sft", "rl", "eval"]


class JobConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    # An experiment: one run folder per (grid point, seed) under the job's folder, then one aggregated report.
    seeds: list[int] = Field(default_factory=list, description="run every cell with each of these seeds")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="dotted key -> values, one cell per "
                                       "combination, e.g. {sft.epochs: [1, 3, 12]}")
    parallel_cells: int = Field(1, ge=1, description="cells run at once, each as a Ray task on this node; "
                                "more than 1 suits a cluster with room for several cells' actors")
    output_dir: str = "runs"
    loggers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=lambda: ["tensorboard"])
    stages: list[Stage] = Field(default_factory=lambda: ["score", "sft", "rl", "eval"])
    models: ModelsConfig
    data: DataConfig = Field(default_factory=DataConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    rl: RlConfig = Field(default_factory=RlConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    @model_validator(mode="after")
    def _scripted_needs_addition(self) -> JobConfig:
        for role in ("student", "reference"):
            source = getattr(self.models, role)
            if source is not None and source.scripted is not None:
                raise ValueError(f"models.{role}: a scripted policy is no model to train or score with; only "
                                 "models.behavior can be scripted")
        if self.models.behavior is not None and self.models.behavior.scripted is not None and self.data.sft:
            raise ValueError("models.behavior.scripted writes the SFT data itself and cannot score data.sft: drop "
                             "data.sft, or give the behaviour model as a path")
        scripted = (self.models.behavior is not None and self.models.behavior.scripted is not None) or \
            self.models.student.prior is not None
        if scripted and self.task.kind != "addition":
            raise ValueError("the scripted two_style policy (models.behavior.scripted, models.student.prior) writes "
                             f"addition traces: it needs task.kind: addition, not {self.task.kind!r}")
        return self

    @model_validator(mode="after")
    def _distillation_has_a_teacher(self) -> JobConfig:
        """Distillation variants need what they read: the teacher's top-k in the SFT data (+distill), a teacher
        model to score the student's samples (+opd), and GRPO-like surrogate settings to carry over (+opd)."""
        modifiers = set().union(*(parse_variant(label)[1] for label in self.sft_variants))
        if "distill" in modifiers and self.data.sft is None and not self.score.teacher_topk:
            raise ValueError("a +distill variant trains on the teacher's top-k log-probs: set score.teacher_topk "
                             "(e.g. 8) so the score stage records them")
        on_policy_distill = "opd" in modifiers or isinstance(self.rl.objective, OnPolicyDistill)
        behavior = self.models.behavior
        if on_policy_distill and (behavior is None or behavior.scripted is not None):
            raise ValueError("on-policy distillation scores the student's samples with the teacher model: give "
                             "models.behavior as a path or a tiny spec (a scripted policy is no model)")
        if "opd" in modifiers and not isinstance(self.rl.objective, (Grpo, OnPolicyDistill)):
            raise ValueError(f"a +opd variant takes its surrogate settings from rl.objective, which is "
                             f"{self.rl.objective.kind!r}: use kind grpo or on_policy_distill")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def uses_gpu(self) -> bool:
        """Any role asks for GPUs: the workers then get no DS_ACCELERATOR=cpu (pear_ray.runtime)."""
        roles = self.resources
        return any(role.num_gpus > 0 for role in (roles.rollout, roles.learner, roles.reference))

    @property
    def sft_variants(self) -> list[str]:
        """The variants to train and compare (comparison mode), or the one `sft.pear` describes."""
        return list(self.sft.variants) or [self.sft.pear.level + ("+distill" if self.sft.pear.base_loss == "distill"
                                                                  else "")]

    def sft_objective(self, variant: str) -> PearSft:
        """The SFT objective of a variant: sft.pear at the variant's level, over the distillation loss with
        `+distill`."""
        level, modifiers = parse_variant(variant)
        return self.sft.pear.model_copy(update={"level": level,
                                                "base_loss": "distill" if "distill" in modifiers else "nll"})

    def rl_objective(self, variant: str) -> RlObjective:
        """The RL objective of a variant: rl.objective, or on-policy distillation with its surrogate settings
        (clip ranges, TIS, aggregation, minibatches, epochs) with `+opd`."""
        _, modifiers = parse_variant(variant)
        if "opd" not in modifiers or isinstance(self.rl.objective, OnPolicyDistill):
            return self.rl.objective
        shared = set(OnPolicyDistill.model_fields) - {"kind"}
        return OnPolicyDistill(**self.rl.objective.model_dump(include=shared))
