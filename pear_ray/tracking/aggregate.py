"""An experiment job's eval results aggregated over seeds (and grid cells): every metric's mean ± SE per label and
stage, and the paired difference of every other label against the baseline (canonical SFT) of the same cell, with a
paired bootstrap 95% interval over prompts and a conclusion sentence that follows from those numbers.

Input: the per-prompt rows of every eval, concatenated into one Arrow table with the columns `COLUMNS` (plus a
`style_<name>` count per response style when the task classifies styles). A label is the variant, plus " | {cell}"
when the row belongs to a grid cell ("token", "token | sft.epochs=3"). The metrics are `pass@k` for each k and
`share_<name>` for each style: the fraction of a prompt's n samples written in that style.

Pure numpy/pyarrow (no Ray), so a finished or half-finished job folder can be re-aggregated at any time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pear_ray import atomic
from pear_ray.objectives.pass_at_k import pass_at_k
from pear_ray.tracking.metrics import STYLE_COUNT_PREFIX, STYLE_SHARE_PREFIX, style_column, style_share
from pear_ray.tracking.plots import EVAL_STAGE_LABELS, order_variants

COLUMNS = ("seed", "cell", "variant", "stage", "prompt_id", "n", "correct")
PASS_AT = "pass@"  # the metrics: pass@<k>, and share_<style> (tracking/metrics.py's style_share)
SUMMARY_FILE = "summary.json"
MINUS = "\u2212"

Counts = dict[str, int]  # one prompt's n, correct and style_<name> counts
Run = dict[int, dict[str, Counts]]  # seed -> prompt_id -> counts of one (cell, variant, stage)


def label_of(cell: str, variant: str) -> str:
    return f"{variant} | {cell}" if cell else variant


def display_name(variant: str) -> str:
    """canonical SFT, token-level PEAR, ...; a variant with a name of its own (token-wide) is called by it."""
    if variant == "none":
        return "canonical SFT"
    return f"{variant}-level PEAR" if variant in ("token", "block", "sequence") else variant


def metric_value(metric: str, counts: Counts) -> float:
    """One prompt's value of `metric`: the unbiased pass@k estimate from (n, correct), or a style's share of n."""
    if metric.startswith(PASS_AT):
        return pass_at_k(counts["n"], counts["correct"], int(metric[len(PASS_AT):]))
    return counts[style_column(metric.removeprefix(STYLE_SHARE_PREFIX))] / counts["n"]


def signed(x: float) -> str:
    """+0.071 / −0.040, with a real minus sign so the sign stands out in prose."""
    return f"{x:+.3f}".replace("-", MINUS)


def standard_error(values: np.ndarray) -> float | None:
    """Sample std (ddof=1) / sqrt(S); None for a single value, where the spread is unknown."""
    return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None


@dataclass(frozen=True)
class Score:
    """One metric of one label after one stage: mean and SE over seeds of the per-seed mean over prompts."""

    mean: float
    se: float | None
    per_seed: dict[int, float]


@dataclass(frozen=True)
class Comparison:
    """Paired difference label − baseline (same cell, seeds and prompts) of one metric after one stage."""

    label: str
    variant: str
    baseline: str
    cell: str
    stage: str
    metric: str
    mean_diff: float
    se_diff: float | None
    seeds_positive: int
    seeds_negative: int
    n_seeds: int
    ci95: tuple[float, float]

    @property
    def seed_ci95(self) -> tuple[float, float] | None:
        """95% t interval of the mean over seeds, mean ± t(S-1) SE: the training runs' own spread, which the
        bootstrap over prompts does not see. None with one seed."""
        if self.se_diff is None:
            return None
        half = t_quantile_975(self.n_seeds - 1) * self.se_diff
        return self.mean_diff - half, self.mean_diff + half

    @property
    def resolved(self) -> bool:
        """Both intervals exclude 0 on the same side: the prompts' (bootstrap) and the seeds' (t). A prompt
        interval alone would call a difference real that another seed could reverse."""
        seeds = self.seed_ci95
        if seeds is None:
            return False
        return min(self.ci95[0], seeds[0]) > 0 or max(self.ci95[1], seeds[1]) < 0

    def as_json(self) -> dict:
        seeds = self.seed_ci95
        return {"mean_diff": self.mean_diff, "se_diff": self.se_diff, "seeds_positive": self.seeds_positive,
                "n_seeds": self.n_seeds, "ci95": list(self.ci95), "seed_ci95": None if seeds is None else list(seeds),
                "resolved": self.resolved}

    @property
    def conclusion(self) -> str:
        name, base = display_name(self.variant), display_name(self.baseline)
        where = (f" at {self.cell}" if self.cell else "") + f" {EVAL_STAGE_LABELS[self.stage]}"
        se = "n/a" if self.se_diff is None else f"{self.se_diff:.3f}"
        size = f"{signed(self.mean_diff)} ± {se} {self.metric}"
        ci = f"95% CI [{signed(self.ci95[0])}, {signed(self.ci95[1])}]"
        seeds = self.seed_ci95
        if seeds is not None:
            ci += f" over prompts, [{signed(seeds[0])}, {signed(seeds[1])}] over seeds"
        if not self.resolved:
            return (f"{name} vs {base}{where}: no difference resolved ({size}, {ci}, "
                    f"{self.seeds_positive}/{self.n_seeds} seeds positive)")
        verb, count = ("beats", self.seeds_positive) if self.ci95[0] > 0 else ("trails", self.seeds_negative)
        return f"{name} {verb} {base}{where} in {count}/{self.n_seeds} seeds, {size} ({ci})"


@dataclass(frozen=True)
class ExperimentSummary:
    """Everything the job's summary.json and report.md show. Labels run cell by cell (first-seen order), variants
    in `order_variants` order; `scores` has every (label, stage, metric) evaluated, `comparisons` every non-baseline
    one; `metrics` are the pass@k ones, then the style shares."""

    baseline: str
    metrics: tuple[str, ...]
    labels: tuple[str, ...]
    label_keys: dict[str, tuple[str, str]]  # label -> (cell, variant)
    seeds: tuple[int, ...]
    cells: tuple[str, ...]
    num_prompts: tuple[int, ...]  # the distinct eval-set sizes (one per (cell, stage), usually all equal)
    n_boot: int
    scores: dict[tuple[str, str, int], Score]
    comparisons: dict[tuple[str, str, int], Comparison]
    mean_weights: dict[str, float]  # label -> mean PEAR weight over SFT steps

    def stages(self) -> list[str]:
        present = {stage for _, stage, _ in self.scores}
        return [stage for stage in EVAL_STAGE_LABELS if stage in present]

    def is_baseline(self, label: str) -> bool:
        return self.label_keys[label][1] == self.baseline


# Student's t 97.5% quantiles by degrees of freedom; between entries the smaller df's (wider) value is used.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom, rounded up to the table's nearest df."""
    return T_975[max(key for key in T_975 if key <= df)]


def paired_bootstrap_ci(diffs: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean of D[s, p] (seed s, prompt p) over prompt resamples: the prompts are the
    noisy sample of the task, so columns are drawn with replacement, the same draw for every seed (the seeds are
    paired runs on the same prompts). Draws: default_rng(seed).integers(0, P, size=(n_boot, P))."""
    per_prompt = diffs.mean(axis=0)  # every column holds S entries, so the mean of D[:, idx] is the mean of these
    idx = np.random.default_rng(seed).integers(0, diffs.shape[1], size=(n_boot, diffs.shape[1]))
    lo, hi = np.percentile(per_prompt[idx].mean(axis=1), [2.5, 97.5])
    return float(lo), float(hi)


def style_columns(table: pa.Table) -> list[str]:
    """The table's style_<name> count columns that every row fills (an older eval wrote none)."""
    return [c for c in table.column_names if c.startswith(STYLE_COUNT_PREFIX) and not table.column(c).null_count]


def _collect(table: pa.Table) -> dict[tuple[str, str, str], Run]:
    """{(cell, variant, stage): Run}, refusing rows the statistics cannot use."""
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"per-prompt table lacks column(s) {missing}; expected {list(COLUMNS)}")
    if table.num_rows == 0:
        raise ValueError("per-prompt table is empty: no eval results to aggregate")
    nulls = [c for c in COLUMNS if table.column(c).null_count]
    if nulls:
        raise ValueError(f"per-prompt table has nulls in column(s) {nulls}")
    counted = ["n", "correct", *style_columns(table)]
    columns = table.select([*COLUMNS[:5], *counted]).to_pylist()
    runs: dict[tuple[str, str, str], Run] = {}
    for row in columns:
        seed, cell, variant, stage, prompt = (row[c] for c in COLUMNS[:5])
        counts = {c: int(row[c]) for c in counted}
        where = f"{label_of(cell, variant)!r}, stage {stage!r}, seed {seed}, prompt {prompt!r}"
        if stage not in EVAL_STAGE_LABELS:
            raise ValueError(f"{where}: unknown stage; expected one of {list(EVAL_STAGE_LABELS)}")
        for name, count in counts.items():
            if name != "n" and not 0 <= count <= counts["n"]:
                raise ValueError(f"{where}: {name}={count} out of n={counts['n']} samples is impossible")
        prompts = runs.setdefault((cell, variant, stage), {}).setdefault(int(seed), {})
        if prompt in prompts:
            raise ValueError(f"{where}: the prompt appears twice")
        prompts[prompt] = counts
    return runs


def _check_paired(label: str, base_label: str, stage: str, run: Run, base: Run) -> None:
    """A label can be paired with its baseline only on the same seeds, and within a seed on the same prompts; the
    baseline's prompts must be the same in every seed so the differences form one seeds x prompts matrix."""
    missing, extra = sorted(set(base) - set(run)), sorted(set(run) - set(base))
    if missing:
        raise ValueError(f"{label!r} has no {stage} results for seed(s) {missing} that its baseline {base_label!r} "
                         f"has")
    if extra:
        raise ValueError(f"{label!r} has {stage} results for seed(s) {extra} that its baseline {base_label!r} lacks, "
                         f"so they cannot be paired")
    first = min(base)
    for seed in sorted(base):
        if set(base[seed]) != set(base[first]):
            raise ValueError(f"baseline {base_label!r} was evaluated on different prompts after {stage} in seed {seed} "
                             f"than in seed {first} ({_unshared(base[seed], base[first])}); every seed needs the "
                             f"same eval prompts")
        if set(run[seed]) != set(base[seed]):
            raise ValueError(f"{label!r} and its baseline {base_label!r} were evaluated on different prompts after "
                             f"{stage} in seed {seed} ({_unshared(run[seed], base[seed])}); pairing needs the same "
                             f"eval prompts")


def _unshared(a: Mapping[str, object], b: Mapping[str, object]) -> str:
    only = sorted(set(a) ^ set(b))
    return f"{len(only)} prompt(s) not in both, e.g. {only[0]!r}"


def _estimates(run: Run, seeds: list[int], prompts: list[str], metric: str, label: str, stage: str) -> np.ndarray:
    """E[s, p]: seed s's value of `metric` on prompt p (pass@k: the unbiased estimate)."""
    out = np.empty((len(seeds), len(prompts)))
    for i, seed in enumerate(seeds):
        for j, prompt in enumerate(prompts):
            counts = run[seed][prompt]
            if metric.startswith(PASS_AT) and counts["n"] < int(metric[len(PASS_AT):]):
                raise ValueError(f"{metric} needs n >= {metric[len(PASS_AT):]} samples per prompt, but {label!r} after "
                                 f"{stage}, seed {seed}, prompt {prompt!r} has n = {counts['n']}")
            out[i, j] = metric_value(metric, counts)
    return out


def aggregate(per_prompt: pa.Table, ks: Iterable[int], baseline: str = "none", n_boot: int = 2000,
              boot_seed: int = 0, mean_weights: Mapping[tuple[str, str], float] | None = None) -> ExperimentSummary:
    """Aggregate the per-prompt eval rows of a job (columns `COLUMNS`) into an `ExperimentSummary`.

    ks: the k of pass@k to report (every prompt needs n >= max(ks)); the style shares come with the table's
        style_<name> columns.
    baseline: the variant every other variant of the same cell is paired with.
    n_boot, boot_seed: bootstrap draws and the seed of their numpy Generator (the same for every comparison).
    mean_weights: {(cell, variant): average PEAR mean_weight over SFT steps}, cell "" when the job has no grid.
    Raises ValueError on input that cannot be paired (see `_check_paired`) or lacks samples for a k.
    """
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers; got {ks}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1; got {n_boot}")
    runs = _collect(per_prompt)
    metrics = (*(f"{PASS_AT}{k}" for k in ks),
               *(style_share(c.removeprefix(STYLE_COUNT_PREFIX)) for c in style_columns(per_prompt)))
    cells = tuple(dict.fromkeys(cell for cell, _, _ in runs))
    label_keys = {label_of(cell, v): (cell, v) for cell in cells
                  for v in order_variants(v for c, v, _ in runs if c == cell)}
    scores: dict[tuple[str, str, int], Score] = {}
    comparisons: dict[tuple[str, str, int], Comparison] = {}
    sizes: set[int] = set()
    for label, (cell, variant) in label_keys.items():
        base_label = label_of(cell, baseline)
        if base_label not in label_keys:
            raise ValueError(f"{label!r} has no baseline: there are no {baseline!r} results in its cell {cell!r}")
        for stage in EVAL_STAGE_LABELS:
            run, base = runs.get((cell, variant, stage), {}), runs.get((cell, baseline, stage), {})
            if not run and not base:
                continue
            _check_paired(label, base_label, stage, run, base)
            seeds = sorted(run)
            prompts = sorted(run[seeds[0]])
            sizes.add(len(prompts))
            for metric in metrics:
                estimates = _estimates(run, seeds, prompts, metric, label, stage)
                per_seed = estimates.mean(axis=1)
                scores[label, stage, metric] = Score(float(per_seed.mean()), standard_error(per_seed),
                                                dict(zip(seeds, per_seed.tolist())))
                if variant == baseline:
                    continue
                diffs = estimates - _estimates(base, seeds, prompts, metric, base_label, stage)
                d = diffs.mean(axis=1)
                comparisons[label, stage, metric] = Comparison(
                    label=label, variant=variant, baseline=baseline, cell=cell, stage=stage, metric=metric,
                    mean_diff=float(d.mean()), se_diff=standard_error(d), seeds_positive=int((d > 0).sum()),
                    seeds_negative=int((d < 0).sum()), n_seeds=len(d),
                    ci95=paired_bootstrap_ci(diffs, n_boot, boot_seed))
    weights = {}
    for key, weight in (mean_weights or {}).items():
        if label_of(*key) not in label_keys:
            raise ValueError(f"mean_weights has {key!r}, but there are no results for that (cell, variant)")
        weights[label_of(*key)] = float(weight)
    return ExperimentSummary(
        baseline=baseline, metrics=metrics, labels=tuple(label_keys), label_keys=label_keys,
        seeds=tuple(sorted({seed for run in runs.values() for seed in run})), cells=cells,
        num_prompts=tuple(sorted(sizes)), n_boot=n_boot, scores=scores, comparisons=comparisons,
        mean_weights=weights)


def write_summary(job_dir: str | Path, summary: ExperimentSummary, primary: dict | None = None) -> Path:
    """job_dir/summary.json, written atomically: the pre-registered primary comparison first (its figures and
    verdict, `PrimaryResult.as_json`; null when the job names none), then {label: {stage: {metric: paired
    difference vs baseline}}} for every non-baseline label under `comparisons`; a value that cannot be computed (an
    SE from one seed) is null, never NaN."""
    tree: dict[str, dict[str, dict[str, dict]]] = {}
    for (label, stage, metric), comparison in summary.comparisons.items():
        tree.setdefault(label, {}).setdefault(stage, {})[metric] = comparison.as_json()
    path = Path(job_dir) / SUMMARY_FILE
    document = {"primary": primary, "baseline": summary.baseline, "comparisons": tree}
    atomic.write_bytes(path, json.dumps(document, indent=2, allow_nan=False).encode() + b"\n")
    return path
