"""An experiment's pre-registered primary comparison: written in the job file before the run, judged by the
thresholds written with it, and put first in summary.json and the report (pear_ray/tracking/preregistration.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pear_ray.config.base import Section

METRIC_PATTERN = r"^(pass@[1-9][0-9]*|share_[A-Za-z0-9_]+)$"
Statistic = Literal["mean", "mean_diff", "seeds_positive", "seed_ci_low", "seed_ci_high", "prompt_ci_low",
                    "prompt_ci_high"]


class Threshold(Section):
    """A bound on one aggregated figure: a variant's mean over seeds, or its paired difference against the primary
    comparison's baseline, of one metric after one stage. Unset variant, stage and metric are the primary's."""

    statistic: Statistic = Field(description="mean: the variant's mean over seeds; mean_diff: the mean paired "
                                 "difference variant - baseline; seeds_positive: how many seeds' differences are "
                                 "above 0; seed_ci_low / seed_ci_high: the difference's 95% t interval over seeds; "
                                 "prompt_ci_low / prompt_ci_high: its paired bootstrap 95% interval over prompts")
    at_least: float | None = Field(None, description="the figure must be >= this")
    at_most: float | None = Field(None, description="the figure must be <= this")
    above: float | None = Field(None, description="the figure must be > this (e.g. seed_ci_low above 0)")
    below: float | None = Field(None, description="the figure must be < this")
    variant: str | None = Field(None, description="an SFT variant's name; null: the primary comparison's variant")
    stage: Literal["sft", "rl"] | None = Field(None, description="after which stage; null: the primary's")
    metric: str | None = Field(None, pattern=METRIC_PATTERN, description="pass@<k> or share_<style> (e.g. "
                               "share_trace, the fraction of samples in the trace style); null: the primary's")

    @model_validator(mode="after")
    def _bounded(self) -> Threshold:
        if all(bound is None for bound in (self.at_least, self.at_most, self.above, self.below)):
            raise ValueError(f"a threshold on {self.statistic} needs a bound: at_least, at_most, above or below")
        return self


class Prediction(Section):
    """A secondary pre-registered prediction: it holds when every one of its thresholds does."""

    says: str = Field(min_length=1, description="the prediction in words, as the report prints it")
    holds_if: list[Threshold] = Field(min_length=1, description="thresholds that must all hold")


class PrimaryComparison(Section):
    """The one comparison an experiment is run to decide, with its prediction and the thresholds that decide it,
    all fixed before the run. Its verdict: supported when every supported_if threshold holds, falsified when every
    falsified_if one does, inconclusive otherwise (or when both sets hold: thresholds that overlap decide nothing)."""

    variant: str = Field(description="the SFT variant under test (a name in sft.variants)")
    baseline: str = Field("none", description="the variant it is paired with, seed by seed and prompt by prompt; "
                          "every other comparison of the report is against it too")
    stage: Literal["sft", "rl"] = Field("rl", description="after which stage the primary metric is read")
    metric: str = Field("pass@1", pattern=METRIC_PATTERN, description="pass@<k> (k in eval.k) or share_<style>")
    prediction: str = Field(min_length=1, description="the pre-registered prediction in words")
    supported_if: list[Threshold] = Field(min_length=1, description="thresholds that must all hold for the "
                                          "prediction to be supported")
    falsified_if: list[Threshold] = Field(default_factory=list, description="thresholds that, all holding, "
                                          "falsify it; empty: the verdict is supported or inconclusive")
    secondary: list[Prediction] = Field(default_factory=list, description="further pre-registered predictions, "
                                        "each reported as held or not after the primary line")

    def thresholds(self) -> list[Threshold]:
        return [*self.supported_if, *self.falsified_if, *(t for p in self.secondary for t in p.holds_if)]
