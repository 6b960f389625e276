"""Rewards from a model (task.reward_models): a sequence classifier, or an LLM judge that writes a score, run by
the reward pool (resources.reward, pear_ray/actors/reward.py) beside the task's verifier."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from pear_ray.config.base import Section
from pear_ray.config.models import ModelSource
from pear_ray.models.tiny import TinyModelSpec
from pear_ray.rewards.judge import check_template


class RewardModel(Section):
    """What every reward model has: a name, a weight in the combined reward, a folder, and its batches."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="names the model's score column "
                      "(reward_<name>) and its metrics; letters, digits and _")
    weight: float = Field(1.0, description="its weight in the reward RL trains on: task.verifier_weight x verifier "
                          "+ the sum of weight x score over the reward models")
    path: str | None = Field(None, description="the model's folder, or a Hub id ('org/name') fetched into the Hub "
                             "cache; a folder wins")
    revision: str | None = Field(None, min_length=1, description="a Hub id's branch, tag or commit; default main")
    tiny: TinyModelSpec | None = Field(None, description="instead of path: a tiny Qwen2 of this spec built on the "
                                       "spot into the run folder's models/reward-<name> (a classifier gets a "
                                       "one-label head), for tests and demos")
    batch_rows: int = Field(16, gt=0, description="samples per forward (classifier) or per generate call (judge)")
    row_timeout_s: float = Field(5.0, gt=0, description="seconds a sample may take: a batch whose forward or "
                                 "generation ends past rows x this gets reward 0 for every sample of it (counted as "
                                 "timeouts), and later batches of the same call are not run (0, timeouts too)")

    @model_validator(mode="after")
    def _path_or_tiny(self) -> RewardModel:
        if (self.path is None) == (self.tiny is None):
            raise ValueError("give exactly one of 'path' (a model folder or Hub id) or 'tiny' (a spec to build)")
        if self.revision is not None and self.path is None:
            raise ValueError("'revision' pins a Hub id: give it with 'path'")
        return self

    @property
    def model(self) -> ModelSource:
        """Where the model comes from, as the job's other models say it (resolve_model, preflight's checks)."""
        return ModelSource(path=self.path, revision=self.revision, tiny=self.tiny)


class ClassifierReward(RewardModel):
    """A Hugging Face sequence classifier with one label (AutoModelForSequenceClassification): the score of a
    sample is sigmoid(logit) of its prompt and response, in the classifier tokenizer's chat template where it
    has one."""

    kind: Literal["classifier"] = Field(description="classifier: score = sigmoid(the classifier's logit)")


class JudgeReward(RewardModel):
    """A generative judge (AutoModelForCausalLM): `template` filled with the sample, asked as a user turn through
    the judge tokenizer's chat template where it has one, answered greedily; the number its answer gives, over
    max_score, is the score."""

    kind: Literal["judge"] = Field(description="judge: an LLM asked to grade the response")
    template: str = Field(description="the judge's question: str.format text that must name {response} and may name "
                          "{prompt} and {answer} (the task's gold answer); a literal brace is {{ or }}")
    max_tokens: int = Field(16, gt=0, description="the most tokens of the judge's answer (greedy)")
    score_pattern: str = Field(r"(-?\d+(?:\.\d+)?)", description="a regex searched in the judge's answer: its first "
                               "group is the number; no match (or no number): reward 0, counted as unparsed")
    max_score: float = Field(10.0, gt=0, description="the judge's top mark: score = number / max_score, clamped to "
                             "[0, 1]")

    _checked_template = field_validator("template")(lambda template: check_template(template))

    @field_validator("score_pattern")
    @classmethod
    def _one_group(cls, pattern: str) -> str:
        try:
            groups = re.compile(pattern).groups
        except re.error as error:
            raise ValueError(f"{pattern!r} is not a regular expression ({error})") from None
        if groups < 1:
            raise ValueError(f"{pattern!r} has no group: its first group must capture the number")
        return pattern


RewardModelConfig = Annotated[Annotated[ClassifierReward, Tag("classifier")] | Annotated[JudgeReward, Tag("judge")],
                              Discriminator("kind")]


def unique_names(models: list[RewardModel]) -> list[RewardModel]:
    """Each reward model's name once (it names a column)."""
    names = [model.name for model in models]
    if repeated := sorted({name for name in names if names.count(name) > 1}):
        raise ValueError(f"reward model names must differ: {repeated} given more than once")
    return models
