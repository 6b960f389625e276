"""The models a job names: the student, the behaviour policy (a model or a scripted policy), the reference."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pear_ray.config.base import Section
from pear_ray.config.optimizer import PriorOptimizer
from pear_ray.models.tiny import TinyModelSpec


class ScriptedPolicy(Section):
    """A behaviour policy written as code, so its log-probs are exact (pear_ray/tasks/addition.py): `two_style`
    writes, per prompt, a worked trace with probability `p_trace` or the bare answer otherwise; `tool_use` calls the
    calculator (`<calc>345+678</calc>`), reads its answer and answers, with probability `p_tool`, or gives the bare
    answer otherwise (multi-turn: for a job with `task.environment: {kind: calculator}`)."""

    name: Literal["two_style", "tool_use"] = Field("two_style", description="the policy: two_style or tool_use")
    p_trace: float = Field(0.5, ge=0, le=1, description="two_style: probability that a response is the worked trace "
                           "rather than the bare answer")
    p_tool: float = Field(0.5, ge=0, le=1, description="tool_use: probability that a response calls the calculator "
                          "rather than giving the bare answer")


class PriorConfig(Section):
    """Canonical SFT of a tiny model on a scripted policy's responses before the job uses it: the prior that
    pre-training gives a real model. Its prompts follow the task's train split (disjoint from train and eval)."""

    policy: ScriptedPolicy = Field(description="the scripted policy whose responses the prior is trained on")
    steps: int = Field(gt=0, description="optimizer steps of the prior's canonical SFT")
    optimizer: PriorOptimizer = Field(default_factory=PriorOptimizer, description="the prior's AdamW and schedule")
    batch_size: int = Field(32, gt=0, description="rows per step, drawn at random from the prior's data")
    num_prompts: int = Field(2048, gt=0, description="prompts the policy answers once each for the prior's data: "
                             "the task's train prompts after the first task.num_train, so none is a train or eval "
                             "prompt")
    seed: int | None = Field(None, description="seeds the prior's data draws and order. null: each seed of an "
                             "experiment trains its own prior from the job's seed. A number N: every seed and cell of "
                             "the experiment starts from one prior trained once (the one seed N trains with null), as "
                             "every run of a study starts from one base model; the seeds then vary data order, SFT "
                             "and RL sampling only")


class LoraConfig(Section):
    """Low-rank adapters on the student: the learner trains B @ A (rank r, scaled by alpha / r) beside each target
    module's frozen weight, and hands out the merged weights W + (alpha / r) B @ A under the model's own names."""

    r: int = Field(8, gt=0, description="rank of each adapter (the inner size of B @ A)")
    alpha: float = Field(16.0, gt=0, description="the adapters' scale is alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on each adapter's input in training forwards "
                           "(never in log-prob passes); 0: none, so logp_old and the training forward agree")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1, description="names (or dotted name suffixes) of the linear modules that get an adapter; the "
        "default is the attention and MLP projections of Qwen2 and Llama models")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class ModelSource(Section):
    """A Hugging Face model folder or Hub id, a tiny model built on the spot from a spec, optionally given a prior, or
    (behaviour only) a scripted policy: exactly one of path, tiny and scripted."""

    path: str | None = Field(None, description="a model folder, or a Hub id ('org/name') fetched into the Hub cache "
                             "(HF_HOME / HF_HUB_CACHE; only the cache with HF_HUB_OFFLINE=1); a folder wins")
    revision: str | None = Field(None, min_length=1, description="a Hub id's branch, tag or commit; default main")
    tiny: TinyModelSpec | None = Field(None, description="a tiny Qwen2 model built on the spot from this spec, into "
                                       "the run folder's models/<role>")
    scripted: ScriptedPolicy | None = Field(None, description="models.behavior only: a policy written as code, whose "
                                            "log-probs are exact (task.kind addition)")
    prior: PriorConfig | None = Field(None, description="models.student with tiny only: canonical SFT on a "
                                      "scripted policy's responses before the score stage; null: the model as built")
    lora: LoraConfig | None = Field(None, description="models.student only: SFT and RL train low-rank adapters on "
                                    "the frozen model (exported merged, and as a peft adapter); null: every weight")

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
    """The student the job trains, the behaviour policy its SFT data comes from, and the frozen reference."""

    student: ModelSource = Field(description="the model SFT and RL train (after its prior, if it has one)")
    behavior: ModelSource | None = Field(None, description="the policy the SFT data comes from: it writes the data "
                                         "when there is no data.sft, scores data.sft when it lacks behaviour "
                                         "log-probs (or the top-k score.teacher_topk asks for), and is the teacher "
                                         "of on-policy distillation; null where data.sft carries what the job needs")
    reference: ModelSource | None = Field(None, description="the frozen model of RL's KL term (rl.objective.kl_coef) "
                                          "and of PEAR's frozen target (sft.pear.target_mode: frozen); null: RL's "
                                          "start model (the variant's SFT export) and the student before SFT")
