"""The stages' settings: score, SFT (PEAR), RL, eval."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from pear_ray.config.base import Section
from pear_ray.config.optimizer import RlOptimizer, SftOptimizer, TeacherOptimizer
from pear_ray.objectives import PEAR_LEVELS, Grpo, PearSft, RlObjective

VARIANT_MODIFIERS = ("distill", "opd")
BASELINE_VARIANT = "none"  # canonical SFT: the variant every other one is compared with


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


class SftVariant(Section):
    """One SFT variant. A label `level[+distill][+opd]` (e.g. `token+distill`) is the variant of that name with
    sft.pear's settings; a mapping gives a name of its own and, for this variant alone, any of sft.pear's settings,
    so one experiment compares settings side by side on the same data and prior, e.g.
    `{name: token-wide, level: token, delta_clip: [-1.0, 0.3]}`. A setting left out (null) is sft.pear's; one given
    is checked as sft.pear's is."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$", description="the variant everywhere: models/sft-<name>, "
                      "eval/sft-<name>.parquet, the state, metrics, reports and plots. `none` is canonical SFT, the "
                      "baseline every other variant is compared with, so only a variant of level none may take it")
    level: str = Field(description="level[+distill][+opd], as a label reads: the PEAR level (none, sequence, token, "
                       "block), +distill to train on the teacher's top-k, +opd to make the variant's RL on-policy "
                       "distillation")
    gamma: float | None = Field(None, description="this variant's sft.pear.gamma; null: sft.pear's")
    block_size: int | None = Field(None, description="this variant's sft.pear.block_size; null: sft.pear's")
    delta_clip: tuple[float, float] | None = Field(None, description="this variant's sft.pear.delta_clip, [low, "
                                                   "high] nats; null: sft.pear's")
    log_weight_clip: tuple[float, float] | None = Field(None, description="this variant's sft.pear.log_weight_clip, "
                                                        "[low, high]; null: sft.pear's")
    target_mode: Literal["online", "frozen"] | None = Field(None, description="this variant's sft.pear.target_mode; "
                                                            "null: sft.pear's")
    normalize: Literal["tokens", "weights"] | None = Field(None, description="this variant's sft.pear.normalize; "
                                                           "null: sft.pear's")

    @model_validator(mode="before")
    @classmethod
    def _label(cls, entry: Any) -> Any:
        """A label is short for the variant named after it, with sft.pear's settings."""
        return {"name": entry, "level": entry} if isinstance(entry, str) else entry

    @field_validator("level")
    @classmethod
    def _level(cls, level: str) -> str:
        parse_variant(level)
        return level

    @model_serializer(mode="wrap")
    def _as_written(self, serialize: SerializerFunctionWrapHandler) -> str | dict[str, Any]:
        """A label's variant is written back as the label, a named one without the settings it leaves to sft.pear:
        config.yaml reads as the job file did."""
        written = {key: value for key, value in serialize(self).items() if value is not None}
        return self.name if written == {"name": self.level, "level": self.level} else written

    @property
    def pear_level(self) -> str:
        return parse_variant(self.level)[0]

    @property
    def modifiers(self) -> set[str]:
        return parse_variant(self.level)[1]

    def objective(self, pear: PearSft) -> PearSft:
        """`pear` at this variant's level, over the distillation loss with `+distill`, with this variant's own
        settings over pear's (validated, so a bound the merge breaks is refused)."""
        own = {key: value for key, value in self if key not in ("name", "level") and value is not None}
        return PearSft.model_validate(pear.model_dump() | own | {
            "level": self.pear_level, "base_loss": "distill" if "distill" in self.modifiers else "nll"})


class SftConfig(Section):
    """PEAR-weighted SFT of the student on the scored data: one variant, or several to compare."""

    pear: PearSft = Field(default_factory=PearSft, description="the SFT objective; each of sft.variants sets its "
                          "level and base loss, and a named variant any of its other settings, for itself")
    variants: list[SftVariant] = Field(default_factory=list, description="comparison mode: variants trained from "
                                       "the same student on the same data, each then through RL and eval. A label "
                                       "level[+distill][+opd] (e.g. none, token, block+distill: +distill trains on "
                                       "the teacher's top-k, +opd makes the variant's RL on-policy distillation), or "
                                       "a mapping {name, level, any of sft.pear's settings}. Empty: the one variant "
                                       "sft.pear describes")
    epochs: int = Field(1, ge=1, description="passes over the SFT data, each in a fresh order drawn from the seed")
    batch_size: int = Field(16, gt=0, description="rows per optimizer step (the teacher's SFT uses it too)")
    optimizer: SftOptimizer = Field(default_factory=SftOptimizer, description="every variant's AdamW and schedule")
    checkpoint_every: int = Field(50, gt=0, description="steps between checkpoints, from which a stopped run resumes; "
                                  "also the prior's and the teacher's SFT")

    @field_validator("variants")
    @classmethod
    def _names_and_settings(cls, variants: list[SftVariant], info: ValidationInfo) -> list[SftVariant]:
        """Every variant has a name of its own, only canonical SFT is the baseline, and its settings over sft.pear's
        make a valid objective."""
        names = [variant.name for variant in variants]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"variant names {twice} are given more than once: each variant's folders, metrics and "
                             "results go by its name; give each a name of its own")
        for variant in variants:
            if variant.name == BASELINE_VARIANT and variant.level != BASELINE_VARIANT:
                raise ValueError(f"variant {variant.name!r} has level {variant.level!r}: the name "
                                 f"{BASELINE_VARIANT!r} is canonical SFT, the baseline every variant is compared "
                                 "with; name this variant otherwise")
            if "pear" in info.data:  # else sft.pear's own error is reported
                try:
                    variant.objective(info.data["pear"])
                except ValidationError as error:
                    problems = "; ".join(f"{'.'.join(map(str, item['loc']))} {item['input']!r}: "
                                         f"{item['msg'].removeprefix('Value error, ')}" for item in error.errors())
                    raise ValueError(f"variant {variant.name!r}: {problems}") from None
        return variants

    @property
    def trained_variants(self) -> list[SftVariant]:
        """The variants to train and compare, or the one sft.pear describes."""
        return self.variants or [SftVariant.model_validate(
            self.pear.level + ("+distill" if self.pear.base_loss == "distill" else ""))]

    def variant(self, name: str) -> SftVariant:
        """The variant named `name`. A name the job does not list is read as a label (`none`, `token+distill`), with
        sft.pear's settings: a stage run alone for a label, as tests and benchmarks do."""
        listed = {variant.name: variant for variant in self.trained_variants}
        if name in listed:
            return listed[name]
        try:
            return SftVariant.model_validate(name)
        except ValidationError:
            raise ValueError(f"no SFT variant is named {name!r} (the job's: {', '.join(listed)}), nor is it a label "
                             "level[+distill][+opd]") from None


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
