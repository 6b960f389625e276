"""The whole job: its sections, and the rules that span several of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pear_ray.config.base import Section
from pear_ray.config.data import DataConfig, SamplingConfig, TaskConfig
from pear_ray.config.gate import GateConfig
from pear_ray.config.models import ModelsConfig
from pear_ray.config.primary import PrimaryComparison
from pear_ray.config.resources import VLLM_LORA_RANKS, ResourcesConfig, VllmOptions
from pear_ray.config.stages import EvalConfig, RlConfig, ScoreConfig, SftConfig, SftVariant
from pear_ray.objectives import Grpo, OnPolicyDistill, PearSft, RlObjective

Stage = Literal["score", "sft", "rl", "eval"]


class JobConfig(Section):
    """A job: the models, the task and data, each stage's settings and the resources, plus an experiment's seeds and
    grid when it is one."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="the run's name: its folder under output_dir, and "
                      "its name in the loggers")
    seed: int = Field(0, description="seeds the data order, the prompts each RL step draws, sampling and the "
                      "learner's RNG (task.split_seed, not this, fixes which prompts the task has)")
    seeds: list[int] = Field(default_factory=list, description="an experiment: every cell runs once per seed, each in "
                             "a run folder of its own under the job's, then one aggregated report; empty: seed alone")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="an experiment: dotted key -> values, one "
                                       "cell per combination, e.g. {sft.epochs: [1, 3, 12]}")
    parallel_cells: int = Field(1, ge=1, description="cells run at once, each as a Ray task on this node; "
                                "more than 1 suits a cluster with room for several cells' actors")
    primary: PrimaryComparison | None = Field(None, description="an experiment's pre-registered primary comparison "
                                              "(variant vs baseline, stage, metric), its prediction and the "
                                              "thresholds of its verdict: first in summary.json and the report")
    output_dir: str = Field("runs", description="the folder run folders go in (output_dir/name), relative to where "
                            "the command runs; a command's --run-dir overrides it")
    loggers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"], description="where metrics go besides the run folder's "
        "metrics.jsonl, which is always written; each must be installed")
    stages: list[Stage] = Field(default_factory=lambda: ["score", "sft", "rl", "eval"], description="the stages to "
                                "run, always in the order score, sft, rl, eval. Without score, SFT reads the data "
                                "an earlier run's score wrote into the run folder; without sft, RL starts from the "
                                "student; eval follows each of sft and rl that runs")
    models: ModelsConfig = Field(description="the student, the behaviour policy and the reference model")
    data: DataConfig = Field(default_factory=DataConfig, description="the SFT data, held-out prompts and token limits")
    task: TaskConfig = Field(default_factory=TaskConfig, description="the prompts, and how answers are checked")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="how the behaviour model writing "
                                     "the data, RL's rollouts and eval sample")
    score: ScoreConfig = Field(default_factory=ScoreConfig, description="stage score: the SFT data with behaviour "
                               "log-probs")
    sft: SftConfig = Field(default_factory=SftConfig, description="stage sft: PEAR-weighted SFT of the student")
    rl: RlConfig = Field(default_factory=RlConfig, description="stage rl: RL of each SFT variant")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="stage eval: pass@k on held-out prompts")
    gate: GateConfig | None = Field(None, description="a check before SFT: the job stops, before any SFT, when "
                                    "the named variant weights one behaviour source's first response token less "
                                    "than min_ratio times another's (in any seed or cell); null: no check")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="where each role runs, and how "
                                       "many of it")

    @model_validator(mode="after")
    def _what_each_role_can_be(self) -> JobConfig:
        """Only the behaviour policy can be scripted; only the student is given a prior or adapters."""
        for role in ("student", "behavior", "reference"):
            source = getattr(self.models, role)
            if source is not None and source.scripted is not None and role != "behavior":
                raise ValueError(f"models.{role}: a scripted policy is no model to train or score with; only "
                                 "models.behavior can be scripted")
            if source is not None and source.prior is not None and role != "student":
                raise ValueError(f"models.{role}.prior: only models.student is given a prior (trained before the "
                                 "score stage); a behaviour or reference model is used as built")
            if source is not None and source.lora is not None and role != "student":
                raise ValueError(f"models.{role}.lora: only models.student is trained, so only it takes adapters")
        return self

    @model_validator(mode="after")
    def _scripted_needs_addition(self) -> JobConfig:
        if self.models.behavior is not None and self.models.behavior.scripted is not None and self.data.sft:
            raise ValueError("models.behavior.scripted writes the SFT data itself and cannot score data.sft: drop "
                             "data.sft, or give the behaviour model as a path")
        policies = {key: policy for key, policy in (
            ("models.behavior.scripted", self.models.behavior and self.models.behavior.scripted),
            ("models.student.prior.policy", self.models.student.prior and self.models.student.prior.policy))
            if policy is not None}
        if policies and self.task.kind != "addition":
            raise ValueError(f"the scripted policies ({', '.join(policies)}) write addition answers, which needs "
                             f"task.kind: addition, not {self.task.kind!r}")
        environment = self.task.environment.kind if self.task.environment is not None else None
        for key, policy in policies.items():
            if policy.name == "tool_use" and environment != "calculator":
                raise ValueError(f"{key}: tool_use calls the calculator, so it needs task.environment: {{kind: "
                                 f"calculator}} (the job has {environment or 'no environment'})")
        return self

    @model_validator(mode="after")
    def _distillation_has_a_teacher(self) -> JobConfig:
        """Distillation variants need what they read: the teacher's top-k in the SFT data (+distill), a teacher
        model to score the student's samples (+opd), and GRPO-like surrogate settings to carry over (+opd)."""
        modifiers = set().union(*(variant.modifiers for variant in self.sft.trained_variants))
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

    @model_validator(mode="after")
    def _gate_can_be_read(self) -> JobConfig:
        """The gate reads, before SFT, a PEAR variant the job trains on data whose rows name their source."""
        gate = self.gate
        if gate is None:
            return self
        if gate.variant not in self.sft_variants:
            raise ValueError(f"gate.variant {gate.variant!r} is none of the job's SFT variants {self.sft_variants}")
        if self.sft_objective(gate.variant).level == "none":
            raise ValueError(f"gate.variant {gate.variant!r} is canonical SFT, which weights every token 1: name a "
                             "variant of PEAR level token, block or sequence")
        if "sft" not in self.stages:
            raise ValueError(f"gate is checked before SFT, and stages {self.stages} run none: add sft, or drop gate")
        behavior = self.models.behavior
        if behavior is not None and behavior.scripted is not None:
            from pear_ray.tasks.addition import BARE, TRACE  # here: the tasks package brings Ray with it

            unknown = [name for name in (gate.numerator, gate.denominator) if name not in (TRACE, BARE)]
            if unknown:
                raise ValueError(f"gate.numerator/denominator {unknown}: the scripted two_style policy labels its "
                                 f"rows {TRACE!r} or {BARE!r}")
        elif self.data.sft is None:
            raise ValueError("gate compares behaviour sources, named by the SFT data's source column, which a "
                             "behaviour model writing the data leaves out: use the scripted two_style policy "
                             "(models.behavior.scripted, task.kind: addition), or give data.sft with a source column")
        return self

    @model_validator(mode="after")
    def _colocated_generation_fits_the_learner(self) -> JobConfig:
        """Colocated generation needs every rank to hold the full weights, and a pool that is the learner's ranks
        cannot grow."""
        rollout, learner = self.resources.rollout, self.resources.learner
        if rollout.colocate and learner.zero_stage == 3:
            raise ValueError("resources.rollout.colocate generates with the weights every learner rank holds; ZeRO-3 "
                             "partitions them: use resources.learner.zero_stage 0, 1 or 2, or colocate: false")
        if rollout.colocate and rollout.max_actors is not None:
            raise ValueError("resources.rollout.colocate: the rollout pool is the learner's ranks and cannot grow; "
                             "drop resources.rollout.max_actors")
        return self

    @model_validator(mode="after")
    def _lora_fits_the_engines(self) -> JobConfig:
        """RL's vLLM engines serve the adapters in a LoRA slot of a rank vLLM has kernels for."""
        lora, engine = self.models.student.lora, self.resources.rollout.engine
        if lora is None:
            return self
        if isinstance(engine, VllmOptions) and lora.r > (engine.max_lora_rank or max(VLLM_LORA_RANKS)):
            raise ValueError(f"resources.rollout.engine.max_lora_rank: vLLM serves LoRA adapters of rank up to "
                             f"{engine.max_lora_rank or max(VLLM_LORA_RANKS)}, and models.student.lora.r is {lora.r}: "
                             "raise max_lora_rank (or leave it null: the smallest that fits is used), or lower r")
        return self

    @model_validator(mode="after")
    def _primary_reads_what_the_job_measures(self) -> JobConfig:
        """The primary comparison and its thresholds name variants the job trains, stages it evaluates, and k it
        reports; a grid has one label per cell, so it has no one primary variant."""
        primary = self.primary
        if primary is None:
            return self
        if self.grid:
            raise ValueError("primary: a grid gives every variant one label per cell; compare one configuration "
                             "(drop grid) or run each grid point as its own job")
        for where, variant, stage, metric in [("primary", primary.variant, primary.stage, primary.metric),
                                              ("primary.baseline", primary.baseline, primary.stage, primary.metric),
                                              *((f"primary threshold on {t.statistic}", t.variant, t.stage, t.metric)
                                                for t in primary.thresholds())]:
            if variant is not None and variant not in self.sft_variants:
                raise ValueError(f"{where}: variant {variant!r} is not in sft.variants {self.sft_variants}")
            if stage is not None and ("eval" not in self.stages or stage not in self.stages):
                raise ValueError(f"{where}: the job does not evaluate after {stage} (stages: {self.stages})")
            if metric is not None and metric.startswith("pass@") and int(metric[5:]) not in self.eval.k:
                raise ValueError(f"{where}: {metric} is not reported; eval.k is {self.eval.k}")
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
        """The names of the variants to train and compare (comparison mode), or of the one `sft.pear` describes."""
        return [variant.name for variant in self.sft.trained_variants]

    def sft_variant(self, name: str) -> SftVariant:
        """The variant named `name`: its level, modifiers and own PEAR settings."""
        return self.sft.variant(name)

    def sft_objective(self, name: str) -> PearSft:
        """The SFT objective of a variant: sft.pear at the variant's level, over the distillation loss with
        `+distill`, with the variant's own settings over sft.pear's."""
        return self.sft_variant(name).objective(self.sft.pear)

    def rl_objective(self, name: str) -> RlObjective:
        """The RL objective of a variant: rl.objective, or on-policy distillation with its surrogate settings
        (clip ranges, TIS, aggregation, minibatches, epochs) with `+opd`."""
        if "opd" not in self.sft_variant(name).modifiers or isinstance(self.rl.objective, OnPolicyDistill):
            return self.rl.objective
        shared = set(OnPolicyDistill.model_fields) - {"kind"}
        return OnPolicyDistill(**self.rl.objective.model_dump(include=shared))
