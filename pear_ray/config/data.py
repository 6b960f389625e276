"""Where the prompts and the SFT data come from, and how responses are sampled."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pear_ray.config.base import Section
from pear_ray.config.rewards import RewardModelConfig, unique_names
from pear_ray.data.io import DEFAULT_SPLIT, checked_columns
from pear_ray.plugins import checked_spec


class DataConfig(Section):
    """The SFT data, the held-out prompts, and the token limits every stage cuts prompts and responses to."""

    sft: str | None = Field(None, description="SFT data (prompt/response text or ids, optionally behavior_logprobs "
                            "and teacher_topk): Parquet, JSONL, a `datasets` save_to_disk folder or a Hub dataset id; "
                            "null: the behaviour model writes the data from the task's train prompts")
    sft_split: str = Field(DEFAULT_SPLIT, min_length=1, description="the split of a `datasets` data.sft")
    sft_columns: dict[str, str] = Field(default_factory=dict, description="data.sft's columns under the schema's "
                                        "names, {schema name: its column}, e.g. {prompt: question, response: answer}")
    eval: str | None = Field(None, description="held-out prompts, Parquet or JSONL; defaults to the task's")
    max_prompt_tokens: int = Field(256, gt=0, description="tokens of a prompt kept: a longer one (SFT data, the "
                                   "teacher's data, the task's prompts) keeps its end, the question and the "
                                   "generation prompt")
    max_response_tokens: int = Field(256, gt=0, description="tokens of an SFT (or teacher) data response kept: a "
                                     "longer one keeps its start, and its per-token columns with it; generated "
                                     "responses are bounded by sampling.max_tokens")

    _checked_columns = field_validator("sft_columns")(checked_columns)

    @model_validator(mode="after")
    def _mapping_needs_data(self) -> DataConfig:
        # values, not model_fields_set: a dumped config (config.yaml, an experiment's cell) sets every field
        if self.sft is None and (self.sft_split != DEFAULT_SPLIT or self.sft_columns):
            raise ValueError("data.sft_split and data.sft_columns describe data.sft: give it, or drop them")
        return self


def registered(kind: str, registry: dict[str, Any], what: str) -> str:
    """`kind`, if the registry knows it; else the error that lists the kinds it knows."""
    if kind not in registry:
        raise ValueError(f"unknown {what} kind {kind!r}; known kinds: {', '.join(sorted(registry))}")
    return kind


class EnvironmentConfig(Section):
    """A multi-turn environment the policy talks to (pear_ray/environments/): each sample is an episode of assistant
    turns and the environment's answers between them, token-exact, trained on the policy's tokens only."""

    kind: str = Field(description="a registered environment kind, e.g. calculator (a `<calc>345+678</calc>` tool)")
    max_turns: int = Field(3, gt=0, description="assistant turns an episode has at most; after the last one the "
                           "episode ends (truncated) with the rewards it has")
    step_timeout_s: float = Field(5.0, gt=0, description="seconds one environment step (or reset) may take; past it, "
                                  "or when the environment raises, the episode ends with reward 0 and counts as an "
                                  "environment timeout (or error)")
    args: dict[str, Any] = Field(default_factory=dict, description="the environment's own settings (calculator: none)")

    @field_validator("kind")
    @classmethod
    def _registered_kind(cls, kind: str) -> str:
        from pear_ray.environments import ENVIRONMENTS  # lazily: environments are built from this config

        return registered(kind, ENVIRONMENTS, "environment")


class TaskConfig(Section):
    """A prompt source plus a verifier: a task kind registered in pear_ray/tasks/ (a reasoning-gym dataset, user
    data checked by exact match/math, addition), optionally scored by the job's own reward function instead."""

    kind: str = Field("reasoning_gym", description="a registered task kind: reasoning_gym, user, addition, ...")
    name: str = Field("basic_arithmetic", description="kind reasoning_gym: the dataset (e.g. basic_arithmetic, "
                      "spell_backward); kind user: the task's name in reports (default user); addition: unused")
    args: dict[str, Any] = Field(default_factory=dict, description="the task's own settings: a reasoning-gym "
                                 "dataset's configuration (all but seed and size, which pear_ray sets); user: "
                                 "{ignore_case: true/false}; addition: {digits: 1..9, default 3}")
    path: str | None = Field(None, description="kind user: the prompt + answer data: Parquet, JSONL, a `datasets` "
                             "save_to_disk folder or a Hub dataset id")
    split: str = Field(DEFAULT_SPLIT, min_length=1, description="kind user: the split of a `datasets` task.path")
    columns: dict[str, str] = Field(default_factory=dict, description="kind user: task.path's columns under the "
                                    "schema's names, e.g. {prompt: question, answer: solution}")
    verifier: Literal["task", "exact", "math"] = Field("task", description="how a response's answer is checked: "
                                                      "task, the task's own (a reasoning-gym dataset's scorer; exact "
                                                      "for user data); exact, the answer extracted from the response "
                                                      "equals the gold one, whitespace collapsed; math, math-verify "
                                                      "equivalence. addition always checks exactly; task.reward "
                                                      "replaces any of them")
    num_train: int = Field(256, gt=0, description="train prompts: those the behaviour model answers to write the SFT "
                           "data, and the pool RL's steps draw from (a user file with fewer train rows is cycled)")
    num_eval: int = Field(64, gt=0, description="held-out prompts, none equal to a train prompt, that eval samples "
                          "eval.n times each")
    split_seed: int = Field(0, description="fixes the train/eval split and the prompts drawn, whatever the job's seed "
                            "(which varies initialisation, data order and sampling), so seeds are evaluated alike")
    verifier_timeout_s: float = Field(5.0, gt=0, description="seconds the verifier (or task.reward) may spend on one "
                                      "response; past it the response gets reward 0 and counts as a timeout")
    reward: str | None = Field(None, description="'package.module:function' or 'path/to/file.py:function': "
                               "reward(response: str, answer: str, metadata: dict) -> float replaces the task's "
                               "verifier (pear_ray/tasks/build.py)")
    environment: EnvironmentConfig | None = Field(None, description="null: one prompt, one sampled answer, scored "
                                                  "by the verifier; set: each sample is a multi-turn episode with "
                                                  "this environment, rewarded by it")
    reward_models: list[RewardModelConfig] = Field(
        default_factory=list, description="models that score each sample beside the verifier (resources.reward runs "
        "them): {kind: classifier, ...} or {kind: judge, template, ...}, each with a name and a weight. RL trains on "
        "task.verifier_weight x verifier + the sum of weight x score; eval's pass@k stays on the verifier. []: none")
    verifier_weight: float = Field(1.0, description="the verifier's weight in the reward RL trains on when "
                                   "task.reward_models is set (1: as is; 0: the models alone)")

    @field_validator("kind")
    @classmethod
    def _registered_kind(cls, kind: str) -> str:
        from pear_ray.tasks.registry import KINDS  # lazily: the tasks package builds tasks from this config

        return registered(kind, KINDS, "task")

    _checked_columns = field_validator("columns")(checked_columns)
    _unique_reward_models = field_validator("reward_models")(unique_names)

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
    with top_p < 1 the truncated importance weight (rl.objective.tis_cap) also corrects for the nucleus."""

    temperature: float = Field(1.0, gt=0, description="sampling temperature (eval has its own, eval.temperature); "
                               "> 0: greedy decoding has no distribution to record")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: sample among the most likely tokens whose "
                         "probabilities add up to top_p; 1: the whole distribution")
    max_tokens: int = Field(64, gt=0, description="the most tokens a sampled response has")
