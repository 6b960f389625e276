"""job_dir/report.md of an experiment job (several seeds, optionally a grid of config values): its pre-registered
primary comparison and verdict first when the job names one, then pass@k (and style shares) mean ± SE per
label, the paired differences against canonical SFT with their bootstrap intervals and conclusions, an honest noise
line, a ranking of every checkpoint after SFT vs after RL when the job has a grid (does the order reverse?), and the
plots under job_dir/plots/."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from pear_ray import atomic
from pear_ray.tracking.aggregate import PASS_AT, ExperimentSummary, Score, display_name, signed
from pear_ray.tracking.plots import EVAL_STAGE_LABELS, PLOTS_DIR, save_figure, subplots
from pear_ray.tracking.preregistration import Check, PrimaryResult
from pear_ray.tracking.report import DASH, REPORT_FILE, WEIGHT_NOTE

SCORES_PNG = "experiment_pass_at_k.png"
DIFFERENCES_PNG = "paired_differences.png"
PLOT_CAPTIONS = {SCORES_PNG: "every metric per label, mean ± SE over seeds",
                 DIFFERENCES_PNG: "paired differences against the baseline, 95% intervals over prompts and seeds"}
STAGE_COLORS = {"sft": "C0", "rl": "C1"}


def _fmt_score(score: Score | None) -> str:
    if score is None:
        return DASH
    return f"{score.mean:.3f}" if score.se is None else f"{score.mean:.3f} ± {score.se:.3f}"


def _row(cells: Sequence[str]) -> str:
    """A markdown table row; a "|" inside a cell (grid-cell labels hold one) is escaped so it cannot split the cell."""
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [_row(head), "|" + "---|" + "---:|" * (len(head) - 1), *(_row(row) for row in rows), ""]


def ranking_metric(summary: ExperimentSummary) -> str:
    """The metric the reversal check ranks by: the first pass@k reported (the smallest k, pass@1 when evaluated)."""
    return next(metric for metric in summary.metrics if metric.startswith(PASS_AT))


def ranked(summary: ExperimentSummary, stage: str, metric: str) -> list[tuple[str, float]]:
    """(label, mean of the metric) best first; ties keep the label order."""
    pairs = [(label, summary.scores[label, stage, metric].mean) for label in summary.labels
             if (label, stage, metric) in summary.scores]
    return sorted(pairs, key=lambda pair: -pair[1])


def _ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    values = np.asarray(values, dtype=float)
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="stable")] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        ranks[values == value] = ranks[values == value].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (Pearson on average ranks); None when undefined (under 2 points, or a constant)."""
    rx, ry = _ranks(x), _ranks(y)
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _scores_section(summary: ExperimentSummary) -> list[str]:
    lines = []
    for stage in summary.stages():
        rows = []
        for label in summary.labels:
            if not any((label, stage, metric) in summary.scores for metric in summary.metrics):
                continue
            weight = summary.mean_weights.get(label)
            name = f"{label} (baseline)" if summary.is_baseline(label) else label
            rows.append([name, DASH if weight is None else f"{weight:.3f}",
                         *(_fmt_score(summary.scores.get((label, stage, metric))) for metric in summary.metrics)])
        lines += [f"### {EVAL_STAGE_LABELS[stage][0].upper()}{EVAL_STAGE_LABELS[stage][1:]}", ""]
        lines += _table(["label", "mean PEAR weight", *summary.metrics], rows)
    lines += [f"The mean PEAR weight is the average token weight over the SFT steps (1 for canonical SFT). "
              f"{WEIGHT_NOTE}", ""]
    return lines


def _differences_section(summary: ExperimentSummary) -> list[str]:
    if not summary.comparisons:
        return [f"No label to compare with the baseline `{summary.baseline}`.", ""]
    rows = []
    for c in summary.comparisons.values():
        se = DASH if c.se_diff is None else f"{c.se_diff:.3f}"
        seeds = DASH if c.seed_ci95 is None else f"[{signed(c.seed_ci95[0])}, {signed(c.seed_ci95[1])}]"
        rows.append([c.label, EVAL_STAGE_LABELS[c.stage], c.metric, f"{signed(c.mean_diff)} ± {se}",
                     f"{c.seeds_positive}/{c.n_seeds}", f"[{signed(c.ci95[0])}, {signed(c.ci95[1])}]", seeds,
                     "yes" if c.resolved else "no"])
    head = ["label", "stage", "metric", "mean diff ± SE", "seeds positive", "95% CI over prompts",
            "95% CI over seeds", "resolved"]
    lines = _table(head, rows)
    lines += ["### Conclusions", "", *(f"- {c.conclusion}." for c in summary.comparisons.values()), ""]
    return lines


def _checks_table(checks: Sequence[Check]) -> list[str]:
    rows = [[check.figure, check.bound, DASH if check.value is None else f"{check.value:+.3f}",
             "yes" if check.holds else "no"] for check in checks]
    return _table(["figure", "threshold", "value", "holds"], rows)


def _primary_section(result: PrimaryResult) -> list[str]:
    """The pre-registered primary comparison: its line and verdict, the thresholds behind the verdict, then each
    secondary prediction, held or not."""
    lines = ["## Primary comparison (pre-registered)", "", f"**{result.line}.**", "",
             f"Prediction, written in the job before the run: {result.primary.prediction}", "",
             "Supported if every one of these holds:", "", *_checks_table(result.supported)]
    if result.falsified:
        lines += ["Falsified if every one of these holds:", "", *_checks_table(result.falsified)]
    for index, (says, checks) in enumerate(result.secondary, 1):
        held = "held" if all(check.holds for check in checks) else "did not hold"
        lines += [f"Secondary prediction {index}, {held}: {says}", "", *_checks_table(checks)]
    return lines


def _noise_line(summary: ExperimentSummary) -> list[str]:
    counts = summary.num_prompts
    sizes = str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
    seeds = ", ".join(str(s) for s in summary.seeds)
    spread = (f"reported as mean ± SE over {len(summary.seeds)} seeds ({seeds}); the SE is the seed-to-seed spread"
              if len(summary.seeds) > 1 else f"from a single seed ({seeds}), so there is no standard error")
    return [f"**Noise:** each score is a mean over N = {sizes} eval prompts, {spread}. The 95% CI resamples the "
            f"prompts ({summary.n_boot} paired bootstrap draws, the same prompts for every seed); the CI over seeds is "
            "mean ± t SE of the per-seed differences (the training runs' own spread, which resampling prompts does "
            "not see). A difference counts as resolved only when both intervals exclude 0 on the same side.", ""]


def _ranking_section(summary: ExperimentSummary) -> list[str]:
    metric = ranking_metric(summary)
    after_sft, after_rl = ranked(summary, "sft", metric), ranked(summary, "rl", metric)
    if not after_sft or not after_rl:
        return [f"The reversal check needs {metric} after both SFT and RL; this job has only one of them.", ""]
    rows = [[str(i + 1), *(f"{pairs[i][0]} ({pairs[i][1]:.3f})" if i < len(pairs) else DASH
                           for pairs in (after_sft, after_rl))]
            for i in range(max(len(after_sft), len(after_rl)))]
    lines = _table(["rank", f"after SFT ({metric})", f"after RL ({metric})"], rows)
    rl_scores = dict(after_rl)
    common = [(score, rl_scores[label]) for label, score in after_sft if label in rl_scores]
    rho = spearman([a for a, _ in common], [b for _, b in common])
    top_sft, top_rl = after_sft[0][0], after_rl[0][0]
    top = (f"agree on the top label (`{top_sft}` is best after both)" if top_sft == top_rl else
           f"disagree on the top label (best after SFT: `{top_sft}`, best after RL: `{top_rl}`)")
    corr = "undefined" if rho is None else signed(rho)
    lines += [f"The SFT and RL rankings {top}; Spearman rank correlation between the two rankings: ρ = {corr} over "
              f"{len(common)} labels. Compare the gaps with the standard errors above before reading a reversal.", ""]
    return lines


def _panels(n_labels: int, n_panels: int) -> tuple[Figure, np.ndarray]:
    """One panel per metric, stacked, so long grid-cell labels stay readable under the bottom one."""
    fig, axes = subplots(n_panels, 1, (max(6.0, 0.8 * n_labels + 3), 3.2 * n_panels + 1.4))
    return fig, axes[:, 0]


def _finish(fig: Figure, axes: np.ndarray, labels: Sequence[str], title: str) -> None:
    for ax in axes:
        ax.set_xticks(np.arange(len(labels)), labels, rotation=30, ha="right")
        ax.tick_params(labelbottom=ax is axes[-1])
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title)


def plot_scores(summary: ExperimentSummary, path: Path) -> Path | None:
    """Bars of every metric per label after SFT and after RL, SE error bars, one panel per metric."""
    stages = summary.stages()
    if not stages:
        return None
    x = np.arange(len(summary.labels))
    width = 0.8 / len(stages)
    fig, axes = _panels(len(x), len(summary.metrics))
    for ax, metric in zip(axes, summary.metrics):
        for i, stage in enumerate(stages):
            scores = [summary.scores.get((label, stage, metric)) for label in summary.labels]
            heights = [math.nan if s is None else s.mean for s in scores]
            errors = [0.0 if s is None or s.se is None else s.se for s in scores]
            ax.bar(x + (i - (len(stages) - 1) / 2) * width, heights, width, yerr=errors, capsize=3,
                   color=STAGE_COLORS[stage], label=EVAL_STAGE_LABELS[stage])
        ax.set(ylabel=metric, ylim=(0, 1.05))
    _finish(fig, axes, summary.labels, f"every metric per label, mean ± SE over {len(summary.seeds)} seed(s)")
    return save_figure(fig, path)


def plot_differences(summary: ExperimentSummary, path: Path) -> Path | None:
    """Mean paired difference against the baseline per label: its 95% interval over prompts (bootstrap) as the thick
    bar, over seeds (t) as the thin one, and a zero line."""
    labels = list(dict.fromkeys(label for label, _, _ in summary.comparisons))
    if not labels:
        return None
    stages = summary.stages()
    fig, axes = _panels(len(labels), len(summary.metrics))
    for ax, metric in zip(axes, summary.metrics):
        ax.axhline(0, color="black", linewidth=0.8)
        for i, stage in enumerate(stages):
            found = [(j, summary.comparisons[label, stage, metric]) for j, label in enumerate(labels)
                     if (label, stage, metric) in summary.comparisons]
            xs = np.array([j for j, _ in found]) + (i - (len(stages) - 1) / 2) * 0.25
            # The interval is drawn as it is (a percentile interval need not be centred on the mean).
            ax.vlines(xs, [c.ci95[0] for _, c in found], [c.ci95[1] for _, c in found], color=STAGE_COLORS[stage],
                      linewidth=2.5)
            seeds = [(x, c.seed_ci95) for x, (_, c) in zip(xs, found) if c.seed_ci95 is not None]
            ax.vlines([x for x, _ in seeds], [lo for _, (lo, _) in seeds], [hi for _, (_, hi) in seeds],
                      color=STAGE_COLORS[stage], linewidth=0.8)
            ax.plot(xs, [c.mean_diff for _, c in found], "o", color=STAGE_COLORS[stage],
                    label=EVAL_STAGE_LABELS[stage])
        ax.set(ylabel=f"Δ {metric}")
    _finish(fig, axes, labels, f"every metric minus {display_name(summary.baseline)}, paired\n"
                               "95% intervals: thick over prompts, thin over seeds")
    return save_figure(fig, path)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


def write_experiment_report(job_dir: str | Path, summary: ExperimentSummary, *, job_name: str, seeds: Sequence[int],
                            cells: Sequence[str], extra: Mapping[str, Any] | None,
                            wall_seconds: float | None, primary: PrimaryResult | None = None) -> Path:
    """Write job_dir/report.md and its plots (job_dir/plots/); return the report's path.

    seeds, cells: what the job was asked to run; a header note names the ones that have results when they differ.
    extra: further header lines ("key: value"); wall_seconds: the job's wall time, None when unknown.
    primary: the judged pre-registered comparison, shown before any other figure.
    """
    job_dir = Path(job_dir)
    plots_dir = job_dir / PLOTS_DIR
    plots_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    for name, make in ((SCORES_PNG, plot_scores), (DIFFERENCES_PNG, plot_differences)):
        (plots_dir / name).unlink(missing_ok=True)  # a plot with no data this time must not survive from before
        if make(summary, plots_dir / name) is not None:
            plots.append(name)
    asked_seeds = ", ".join(str(s) for s in seeds)
    if sorted(seeds) != list(summary.seeds):
        asked_seeds += f" (results for {', '.join(str(s) for s in summary.seeds)})"
    asked_cells = ", ".join(f"`{c}`" for c in cells if c) or "none (one configuration)"
    if [c for c in cells if c] != [c for c in summary.cells if c]:
        asked_cells += f" (results for {', '.join(f'`{c}`' for c in summary.cells if c) or 'no grid cell'})"
    lines = [
        f"# pear_ray experiment report: {job_name}",
        "",
        f"- job: `{job_name}`",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- seeds: {asked_seeds}",
        f"- grid cells: {asked_cells}",
        f"- baseline: `{summary.baseline}` ({display_name(summary.baseline)})",
        f"- wall time: {_duration(wall_seconds)} (every invocation of the job, resumed ones included)",
        *(f"- {key}: {value}" for key, value in (extra or {}).items()),
        "",
        *(_primary_section(primary) if primary is not None else []),
        "## Every metric per label (mean ± SE over seeds)",
        "",
        *_scores_section(summary),
        f"## Paired differences against {display_name(summary.baseline)} (same cell, seeds and prompts)",
        "",
        *_differences_section(summary),
        *_noise_line(summary),
    ]
    if len(summary.cells) > 1:
        lines += ["## Reversal check: every checkpoint ranked after SFT and after RL", "", *_ranking_section(summary)]
    lines += ["## Plots", "", *(f"![{PLOT_CAPTIONS[name]}]({PLOTS_DIR}/{name})\n" for name in plots)]
    path = job_dir / REPORT_FILE
    atomic.write_bytes(path, "\n".join(lines).rstrip("\n").encode() + b"\n")
    return path
