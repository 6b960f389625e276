"""A pre-registered primary comparison judged against an experiment's aggregated figures: the figure each threshold
reads, whether it holds, and the verdict (supported / falsified / inconclusive). Pure: config and summary in,
figures out, so a finished job folder can be judged again at any time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pear_ray.tracking.aggregate import Comparison, ExperimentSummary, display_name, signed
from pear_ray.tracking.plots import EVAL_STAGE_LABELS

if TYPE_CHECKING:
    from pear_ray.config.primary import PrimaryComparison, Threshold

SUPPORTED, FALSIFIED, INCONCLUSIVE = "supported", "falsified", "inconclusive"


@dataclass(frozen=True)
class Check:
    """One threshold, the figure it read (None when the results cannot give it, e.g. an interval over one seed) and
    whether it holds (never, without a figure)."""

    threshold: Threshold
    variant: str
    stage: str
    metric: str
    value: float | None

    @property
    def holds(self) -> bool:
        t, v = self.threshold, self.value
        if v is None:
            return False
        return ((t.at_least is None or v >= t.at_least) and (t.at_most is None or v <= t.at_most)
                and (t.above is None or v > t.above) and (t.below is None or v < t.below))

    @property
    def bound(self) -> str:
        t = self.threshold
        parts = [(">=", t.at_least), ("<=", t.at_most), (">", t.above), ("<", t.below)]
        return " and ".join(f"{op} {value:g}" for op, value in parts if value is not None)

    @property
    def figure(self) -> str:
        """What was read, e.g. `mean_diff of share_trace (token-wide) after SFT`."""
        return f"{self.threshold.statistic} of {self.metric} ({self.variant}) {EVAL_STAGE_LABELS[self.stage]}"

    def as_json(self) -> dict:
        return {"figure": self.figure, "bound": self.bound, "value": self.value, "holds": self.holds}


@dataclass(frozen=True)
class PrimaryResult:
    """The primary comparison's figures, verdict and the checks behind it, and every secondary prediction's."""

    primary: PrimaryComparison
    comparison: Comparison | None  # None when the results lack the primary's variant, stage or metric
    supported: list[Check]
    falsified: list[Check]
    secondary: list[tuple[str, list[Check]]]

    @property
    def verdict(self) -> str:
        supported = all(check.holds for check in self.supported)
        falsified = bool(self.falsified) and all(check.holds for check in self.falsified)
        if supported == falsified:  # neither, or thresholds that overlap
            return INCONCLUSIVE
        return SUPPORTED if supported else FALSIFIED

    @property
    def line(self) -> str:
        """The primary line: what was compared, its figures, the verdict."""
        p = self.primary
        what = (f"{display_name(p.variant)} vs {display_name(p.baseline)}, {p.metric} "
                f"{EVAL_STAGE_LABELS[p.stage]}")
        c = self.comparison
        if c is None:
            return f"{what}: no results, so the prediction is {INCONCLUSIVE}"
        se = "n/a" if c.se_diff is None else f"{c.se_diff:.3f}"
        seeds = "n/a (one seed)" if c.seed_ci95 is None else f"[{signed(c.seed_ci95[0])}, {signed(c.seed_ci95[1])}]"
        return (f"{what}: {signed(c.mean_diff)} ± {se} (mean paired difference ± SE over {c.n_seeds} seeds), "
                f"{c.seeds_positive}/{c.n_seeds} seeds positive, 95% CI [{signed(c.ci95[0])}, {signed(c.ci95[1])}] "
                f"over prompts, {seeds} over seeds: {self.verdict}")

    def as_json(self) -> dict:
        p = self.primary
        return {"variant": p.variant, "baseline": p.baseline, "stage": p.stage, "metric": p.metric,
                "prediction": p.prediction, "verdict": self.verdict, "line": self.line,
                "comparison": None if self.comparison is None else self.comparison.as_json(),
                "supported_if": [check.as_json() for check in self.supported],
                "falsified_if": [check.as_json() for check in self.falsified],
                "secondary": [{"says": says, "holds": all(check.holds for check in checks),
                               "checks": [check.as_json() for check in checks]} for says, checks in self.secondary]}


def read_figure(summary: ExperimentSummary, statistic: str, variant: str, stage: str, metric: str) -> float | None:
    """One figure of the summary (see `Threshold.statistic`); None where the results do not have it."""
    if statistic == "mean":
        score = summary.scores.get((variant, stage, metric))
        return None if score is None else score.mean
    comparison = summary.comparisons.get((variant, stage, metric))
    if comparison is None:
        return None
    seeds = comparison.seed_ci95
    return {"mean_diff": comparison.mean_diff, "seeds_positive": float(comparison.seeds_positive),
            "prompt_ci_low": comparison.ci95[0], "prompt_ci_high": comparison.ci95[1],
            "seed_ci_low": None if seeds is None else seeds[0],
            "seed_ci_high": None if seeds is None else seeds[1]}[statistic]


def judge(primary: PrimaryComparison, summary: ExperimentSummary) -> PrimaryResult:
    """Every threshold read from `summary` (aggregated against `primary.baseline`, with no grid), and the verdict."""
    if summary.baseline != primary.baseline:
        raise ValueError(f"the summary's baseline is {summary.baseline!r}, the primary comparison's "
                         f"{primary.baseline!r}: aggregate against the primary's baseline")

    def checks(thresholds: list[Threshold]) -> list[Check]:
        out = []
        for t in thresholds:
            variant, stage, metric = t.variant or primary.variant, t.stage or primary.stage, t.metric or primary.metric
            out.append(Check(t, variant, stage, metric, read_figure(summary, t.statistic, variant, stage, metric)))
        return out

    return PrimaryResult(primary=primary,
                         comparison=summary.comparisons.get((primary.variant, primary.stage, primary.metric)),
                         supported=checks(primary.supported_if), falsified=checks(primary.falsified_if),
                         secondary=[(p.says, checks(p.holds_if)) for p in primary.secondary])
