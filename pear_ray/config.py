"""The typed job config: one YAML file under jobs/, plus dotted overrides from the command line.

Every section forbids unknown keys, so a typo is refused with the key's full dotted path instead of
being silently ignored. `load_job(path, overrides)` is the only entry point the CLI and the driver use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pear_ray.data.io import DEFAULT_SPLIT, checked_columns
from pear_ray.models.tiny import TinyModelSpec
from pear_ray.objectives import PEAR_LEVELS, Grpo, OnPolicyDistill, PearSft, RlObjective
from pear_ray.plugins import checked_spec

Stage = Literal["score", "sft", "rl", "eval"]
VARIANT_MODIFIERS = ("distill", "opd")


class ConfigError(ValueError):
    """A job file or override that cannot be used; the message names the key and what was expected."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    lr: float = Field(3e-3, gt=0)
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


class DataConfig(Section):
    sft: str | None = Field(None, description="SFT data (prompt/response text or ids): Parquet, JSONL, a `datasets` "
                            "save_to_disk folder or a Hub dataset id")
    sft_split: str = Field(DEFAULT_SPLIT, min_length=1, description="the split of a `datasets` data.sft")
    sft_columns: dict[str, str] = Field(default_factory=dict, description="data.sft's columns under the schema's "
                                        "names, {schema name: its column}, e.g. {prompt: question, response: answer}")
    eval: str | None = Field(None, description="held-out prompts, Parquet or JSONL; defaults to the task's")
    max_prompt_tokens: int = Field(256, gt=0)
    max_response_tokens: int = Field(256, gt=0)

    _checked_columns = field_validator("sft_columns")(checked_columns)

    @model_validator(mode="after")
    def _mapping_needs_data(self) -> DataConfig:
        # values, not model_fields_set: a dumped config (config.yaml, an experiment's cell) sets every field
        if self.sft is None and (self.sft_split != DEFAULT_SPLIT or self.sft_columns):
            raise ValueError("data.sft_split and data.sft_columns describe data.sft: give it, or drop them")
        return self


class TaskConfig(Section):
    """A prompt source plus a verifier: a task kind registered in pear_ray/tasks/ (a reasoning-gym dataset, user
    data checked by exact match/math, addition), optionally scored by the job's own reward function instead."""

    kind: str = Field("reasoning_gym", description="a registered task kind: reasoning_gym, user, addition, ...")
    name: str = "basic_arithmetic"
    args: dict[str, Any] = Field(default_factory=dict)
    path: str | None = Field(None, description="kind user: the prompt + answer data: Parquet, JSONL, a `datasets` "
                             "save_to_disk folder or a Hub dataset id")
    split: str = Field(DEFAULT_SPLIT, min_length=1, description="kind user: the split of a `datasets` task.path")
    columns: dict[str, str] = Field(default_factory=dict, description="kind user: task.path's columns under the "
                                    "schema's names, e.g. {prompt: question, answer: solution}")
    verifier: Literal["task", "exact", "math"] = "task"
    num_train: int = Field(256, gt=0)
    num_eval: int = Field(64, gt=0)
    split_seed: int = Field(0, description="fixes the train/eval split and the prompts drawn, whatever job.seed (which "
                            "varies initialisation, data order and sampling), so seeds are evaluated alike")
    verifier_timeout_s: float = Field(5.0, gt=0)
    reward: str | None = Field(None, description="'package.module:function' or 'path/to/file.py:function': "
                               "reward(response: str, answer: str, metadata: dict) -> float replaces the task's "
                               "verifier (pear_ray/tasks/build.py)")

    @field_validator("kind")
    @classmethod
    def _registered_kind(cls, kind: str) -> str:
        from pear_ray.tasks.registry import KINDS  # lazily: the tasks package builds tasks from this config

        if kind not in KINDS:
            raise ValueError(f"unknown task kind {kind!r}; known kinds: {', '.join(sorted(KINDS))}")
        return kind

    _checked_columns = field_validator("columns")(checked_columns)

    @model_validator(mode="after")
    def _mapping_needs_user_data(self) -> TaskConfig:
        if self.kind != "user" and (self.split != DEFAULT_SPLIT or self.columns):
            raise ValueError(f"task.split and task.columns describe a user task's task.path, not kind {self.kind!r}")
        return self

    @field_validator("reward")
    @classmethod
    def _loadable_reward(cls, spec: str | None) -> str | None:
        return None if spec is None else checked_spec(spec)

    @property
    def title(self) -> str:
        """What a report calls the task: the reasoning-gym dataset, the user file, or `addition`, with its args."""
        name = {"reasoning_gym": self.name, "user": self.path or self.name}.get(self.kind, self.kind)
        return f"{name} {self.args}" if self.args else name


class SamplingConfig(Section):
    """How the behaviour model writing SFT data and the RL rollouts sample. Each sample's recorded log-probs are of
    that distribution (logits / temperature over the top-p nucleus); the RL learner scores logits / temperature, so
    with top_p < 1 the truncated importance weight (rl.tis_cap) also corrects for the nucleus."""

    temperature: float = Field(1.0, gt=0, description="> 0: greedy decoding has no distribution to record")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(64, gt=0)


class ScoreConfig(Section):
    """Bringing SFT data to behaviour log-probs (and, with `teacher_topk`, the teacher's top-k). Without `data.sft`,
    the behaviour model writes the data from the task's train prompts (recording its log-probs as it samples), after
    `teacher_sft_steps` of canonical SFT on the task's gold answers (a briefly trained teacher, off the student's
    distribution)."""

    batch_size: int = Field(64, gt=0)
    samples_per_prompt: int = Field(1, ge=1)
    keep: Literal["all", "correct"] = "all"
    teacher_sft_steps: int = Field(0, ge=0)
    teacher_lr: float = Field(1e-3, gt=0)
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
    lr: float = Field(1e-5, gt=0)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    grad_clip: float = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
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
    lr: float = Field(1e-6, gt=0)
    objective: RlObjective = Field(default_factory=Grpo, description="grpo (default), on_policy_distill or a "
                                   "custom plug-in (kind: custom, function: module:function)")
    normalize_std: bool = Field(True, description="group advantages divided by the group's reward std (GRPO)")
    drop_constant_groups: bool = Field(True, description="drop groups whose rewards are all equal (no signal), "
                                       "when the objective reads the advantage")
    grad_clip: float = Field(1.0, gt=0)
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


class ActorResources(Section):
    """Resources of one actor of a role; custom resources pin roles to node groups on a cluster."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict)


class RolloutResources(ActorResources):
    num_actors: int = Field(1, ge=1, description="actors to start with, and the fewest to keep")
    max_actors: int | None = Field(None, ge=1, description="grow up to this many as the cluster has room; "
                                   "null keeps the pool at num_actors")
    max_in_flight: int = Field(2, ge=1, description="batches queued per actor (back-pressure)")
    call_timeout_s: float = Field(900.0, gt=0, description="seconds an actor with work in flight may answer none of "
                                  "it before it counts as hung: it is killed and replaced, its batches re-run. "
                                  "Counted from its last answer, not per queued batch, so it must cover the slowest "
                                  "single batch or weight update; starting up does not count")
    backend: Literal["vllm", "transformers"] = Field(
        "vllm", description="what generates and scores: vLLM, or the model's own transformers forward in the actor "
        "(faster for tiny models on CPU, where vLLM's per-step scheduling outweighs the model)")
    # Extra engine arguments. vLLM's, e.g. on a GPU {dtype: bfloat16, kv_cache_memory_bytes: null,
    # gpu_memory_utilization: 0.85}; the defaults (fp32, a 64 MiB KV cache) suit tiny models on CPU. transformers':
    # dtype, max_rows (rows per forward).
    engine: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _max_not_below_min(self) -> RolloutResources:
        if self.max_actors is not None and self.max_actors < self.num_actors:
            raise ValueError(f"max_actors={self.max_actors} is below num_actors={self.num_actors}")
        return self


class LearnerResources(ActorResources):
    num_ranks: int = Field(1, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 2
    bf16: bool = Field(False, description="bf16 training with fp32 master weights (GPU)")
    max_tokens_per_micro_batch: int | None = Field(
        None, ge=0, description="per rank: cut each update's rows into micro-batches of at most this many prompt + "
        "response tokens (a longer row alone), each packed without padding, gradients accumulated into one "
        "update; null or 0: one padded forward per update. Near the longest row: sdpa/eager attention over a "
        "packed row still costs its length squared")
    max_restarts: int = Field(0, ge=0, description="times a stage whose learner rank died (killed, out of memory, "
                              "node gone) starts again by itself from its last checkpoint; 0: the stage fails, and "
                              "the same command resumes it")


class ResourcesConfig(Section):
    rollout: RolloutResources = Field(default_factory=RolloutResources)
    learner: LearnerResources = Field(default_factory=LearnerResources)
    reference: ActorResources = Field(default_factory=ActorResources)


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


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML so `3`, `true`, `[1, 8]` get types."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not of the form dotted.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({error.problem})") from None
    set_dotted(tree, key, value)


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, creating sections on the way."""
    *parents, leaf = key.split(".")
    node = tree
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {'.'.join(parents[: depth + 1])!r} is a value, not a section")
        node = child
    node[leaf] = value


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"invalid job config {source}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden" and item["loc"][:1] == ("rl",) and item["loc"][-1] in Grpo.model_fields:
            lines.append(f"  {key}: the RL loss's settings are under rl.objective now: rl.objective.{item['loc'][-1]}")
        elif item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check the spelling; see the section's fields in pear_ray/config.py)")
        elif not item["loc"]:  # a check across sections: the input is the whole job, not worth repeating
            lines.append(f"  {item['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def parse_job(tree: dict[str, Any], source: str = "<dict>") -> JobConfig:
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_describe(error, source)) from None


def load_job(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    """Read a job YAML, apply `dotted.key=value` overrides in order, and validate the result."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"job file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"job file {path} is not valid YAML: {error}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"job file {path} must hold a mapping at the top level, not {type(tree).__name__}")
    for override in overrides:
        apply_override(tree, override)
    return parse_job(tree, str(path))


def dump_job(job: JobConfig, path: str | Path) -> None:
    """Write the resolved config next to a run's outputs, so a run folder says how it was made."""
    Path(path).write_text(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False))
