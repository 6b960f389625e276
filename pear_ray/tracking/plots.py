"""PNG plots of a run, drawn from metrics.jsonl and the saved histograms.

Figures are built as bare `matplotlib.figure.Figure`s rendered by the Agg canvas: no display, no pyplot global
state, and no change to the backend of whoever imports this.

A plot whose metrics are absent is skipped (and a stale copy from an earlier call removed), never drawn empty.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from pear_ray import atomic
from pear_ray.tracking.metrics import (
    PEAR_WEIGHTS_HISTOGRAM,
    STYLE_SHARE_PREFIX,
    first_style_share,
    read_histograms,
    read_metrics,
    results_from_metrics,
    variant_name,
)

PLOTS_DIR = "plots"
SFT_LOSS_PNG = "sft_loss.png"
PEAR_DIAGNOSTICS_PNG = "pear_diagnostics.png"
PEAR_HISTOGRAM_PNG = "pear_weight_histogram.png"
RL_PNG = "rl_reward_length.png"
PASS_AT_K_PNG = "pass_at_k.png"
ALL_PLOTS = (SFT_LOSS_PNG, PEAR_DIAGNOSTICS_PNG, PEAR_HISTOGRAM_PNG, RL_PNG, PASS_AT_K_PNG)

# Canonical SFT first (the baseline), then PEAR from coarse to fine; any other variant after, alphabetically.
VARIANT_ORDER = ("none", "sequence", "block", "token")
PEAR_DIAGNOSTICS = {
    "mean_weight": "mean weight",
    "ess_fraction": "ESS / tokens",
    "frac_at_floor": "fraction at floor",
    "frac_at_ceiling": "fraction at ceiling",
    "mean_log_ratio": "mean log-ratio (before clip)",
}
# The first name present is used, so the driver may log either.
RL_REWARD_KEYS = ("reward", "reward_mean")
RL_LENGTH_KEYS = ("response_length", "response_length_mean", "mean_response_length")
EVAL_STAGE_LABELS = {"sft": "after SFT", "rl": "after RL"}


def share_label(name: str) -> str:
    """"trace share" for the metric share_trace."""
    return f"{name.removeprefix(STYLE_SHARE_PREFIX)} share"


def order_variants(variants: Iterable[str]) -> list[str]:
    rank = {v: i for i, v in enumerate(VARIANT_ORDER)}
    return sorted(set(variants), key=lambda v: (rank.get(v, len(rank)), v))


def series(records: Iterable[Mapping[str, Any]], stage: str, name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{variant: (steps, values)} of one metric, sorted by step; the last record of a repeated step wins."""
    points: dict[str, dict[int, float]] = {}
    for rec in records:
        if rec.get("stage") == stage and isinstance(rec.get(name), int | float):
            points.setdefault(variant_name(rec.get("variant")), {})[int(rec["step"])] = float(rec[name])
    out = {}
    for variant in order_variants(points):
        steps = sorted(points[variant])
        out[variant] = (np.array(steps), np.array([points[variant][s] for s in steps]))
    return out


def _first_present(records: list[Mapping[str, Any]], stage: str, names: Iterable[str]) -> tuple[str, dict]:
    for name in names:
        found = series(records, stage, name)
        if found:
            return name, found
    return "", {}


def _colors(variants: Iterable[str]) -> dict[str, Any]:
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    everyone = order_variants(set(VARIANT_ORDER) | set(variants))
    return {v: cycle[i % len(cycle)] for i, v in enumerate(everyone)}


def _line(ax, steps: np.ndarray, values: np.ndarray, label: str, color: Any) -> None:
    ax.plot(steps, values, label=label, color=color, marker="o" if len(steps) <= 30 else None, markersize=3)


def subplots(rows: int, cols: int, figsize: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=figsize, layout="tight")
    return fig, np.asarray(fig.subplots(rows, cols, squeeze=False))


def save_figure(fig: Figure, path: Path) -> Path:
    with atomic.replacing(path) as partial:
        fig.savefig(partial, format=path.suffix.lstrip("."), dpi=110)
    return path


def plot_sft_loss(records: list[Mapping[str, Any]], path: Path) -> Path | None:
    loss = series(records, "sft", "loss")
    if not loss:
        return None
    colors = _colors(loss)
    fig, axes = subplots(1, 1, (7, 4.2))
    ax = axes[0, 0]
    for variant, (steps, values) in loss.items():
        _line(ax, steps, values, variant, colors[variant])
    ax.set(title="SFT loss (PEAR-weighted; 'none' = canonical SFT)", xlabel="SFT step", ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend(title="SFT variant")
    return save_figure(fig, path)


def plot_pear_diagnostics(records: list[Mapping[str, Any]], path: Path) -> Path | None:
    panels = {name: series(records, "sft", name) for name in PEAR_DIAGNOSTICS}
    panels = {name: data for name, data in panels.items() if data}
    if not panels:
        return None
    colors = _colors({v for data in panels.values() for v in data})
    cols = 3
    rows = math.ceil((len(panels) + 1) / cols)  # one spare cell holds the legend
    fig, axes = subplots(rows, cols, (4.2 * cols, 3.2 * rows))
    axes = axes.ravel()
    for ax, (name, data) in zip(axes, panels.items()):
        for variant, (steps, values) in data.items():
            _line(ax, steps, values, variant, colors[variant])
        ax.set(title=PEAR_DIAGNOSTICS[name], xlabel="SFT step")
        ax.grid(alpha=0.3)
    handles: dict[str, Any] = {}
    for ax in axes[: len(panels)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    for ax in axes[len(panels):]:
        ax.axis("off")
    axes[len(panels)].legend(list(handles.values()), list(handles), title="SFT variant", loc="center")
    fig.suptitle("PEAR weight diagnostics per SFT step")
    return save_figure(fig, path)


def plot_weight_histogram(histograms: list[Mapping[str, Any]], path: Path) -> Path | None:
    latest = [h for h in histograms if h["stage"] == "sft" and h["name"] == PEAR_WEIGHTS_HISTOGRAM
              and np.any(np.asarray(h["values"]) > 0)]
    if not latest:
        return None
    by_variant = {h["variant"]: h for h in latest}  # one weight histogram per variant
    variants = order_variants(by_variant)
    colors = _colors(variants)
    positive = np.concatenate([np.asarray(by_variant[v]["values"]) for v in variants])
    positive = positive[positive > 0]
    lo, hi = positive.min(), positive.max()
    if hi / lo < 10:  # widen a narrow range (e.g. canonical SFT, every weight 1) so the log axis stays readable
        mid = math.sqrt(lo * hi)
        lo, hi = mid / 10, mid * 10
    bins = np.geomspace(lo, hi, 60)
    fig, axes = subplots(1, 1, (7, 4.2))
    ax = axes[0, 0]
    for variant in variants:
        values = np.asarray(by_variant[variant]["values"])
        values = values[values > 0]
        label = f"{variant} (step {by_variant[variant]['step']}, {values.size} tokens)"
        if values.min() == values.max():  # e.g. canonical SFT: a spike would flatten every other curve
            ax.axvline(values[0], color=colors[variant], linestyle="--", label=f"{label}: every w = {values[0]:.3g}")
            continue
        ax.hist(values, bins=bins, weights=np.full(values.size, 1 / values.size), histtype="step", linewidth=1.6,
                color=colors[variant], label=label)
    ax.set_xscale("log")
    ax.set(title="PEAR weights at the latest logged SFT step", xlabel="weight w (log scale)",
           ylabel="fraction of response tokens")
    ax.grid(alpha=0.3)
    ax.legend(title="SFT variant", fontsize="small")
    return save_figure(fig, path)


def plot_rl(records: list[Mapping[str, Any]], path: Path) -> Path | None:
    """Reward and response length per RL step, the share of the task's first response style when the task has styles,
    and the rollout pool's size when it changed (elastic pool)."""
    panels = [(title, key, data) for title, keys in (("reward", RL_REWARD_KEYS), ("response length", RL_LENGTH_KEYS))
              for key, data in [_first_present(records, "rl", keys)] if data]
    if share := first_style_share(name for rec in records if rec.get("stage") == "rl" for name in rec):
        panels.append((share_label(share), share, series(records, "rl", share)))
    pool_size = series(records, "rl", "rollout_actors")
    if any(len(set(values)) > 1 for _, values in pool_size.values()):
        panels.append(("rollout actors", "rollout_actors", pool_size))
    if not panels:
        return None
    colors = _colors({v for _, _, data in panels for v in data})
    fig, axes = subplots(1, len(panels), (6 * len(panels), 4.2))
    for ax, (title, key, data) in zip(axes[0], panels):
        for variant, (steps, values) in data.items():
            _line(ax, steps, values, variant, colors[variant])
        ax.set(title=f"RL {title}", xlabel="RL step", ylabel=key + (" (tokens)" if title == "response length" else ""))
        ax.grid(alpha=0.3)
        ax.legend(title="SFT variant (RL start)")
    return save_figure(fig, path)


def pass_at_k_names(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[str]:
    """The pass@k keys present in results, in k order."""
    names = {name for stages in results.values() for values in stages.values() for name in values
             if name.startswith("pass@")}
    return sorted(names, key=lambda n: (int(n[5:]) if n[5:].isdigit() else math.inf, n))


def plot_pass_at_k(results: Mapping[str, Mapping[str, Mapping[str, float]]], path: Path) -> Path | None:
    names = pass_at_k_names(results)
    if not names:
        return None
    variants = order_variants(results)
    stages = [s for s in EVAL_STAGE_LABELS if any(s in results[v] for v in variants)]
    fig, axes = subplots(1, len(names), (max(5.0, 1.3 * len(variants) + 2) * len(names), 4.2))
    width = 0.8 / max(len(stages), 1)
    x = np.arange(len(variants))
    for ax, name in zip(axes[0], names):
        for i, stage in enumerate(stages):
            heights = [results[v].get(stage, {}).get(name, math.nan) for v in variants]
            bars = ax.bar(x + (i - (len(stages) - 1) / 2) * width, heights, width, label=EVAL_STAGE_LABELS[stage])
            ax.bar_label(bars, labels=[f"{h:.2f}" if math.isfinite(h) else "n/a" for h in heights],
                         fontsize="x-small", padding=1)
        ax.set_xticks(x, variants)
        ax.set(title=name, xlabel="SFT variant ('none' = canonical SFT)", ylabel=name, ylim=(0, 1.18))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small", loc="upper center", ncols=len(stages))
    fig.suptitle("pass@k on held-out prompts")
    return save_figure(fig, path)


def plot_run(run_dir: str | Path, results: Mapping[str, Any] | None = None) -> list[Path]:
    """Write every plot that has data into run_dir/plots/ and return their paths.

    `results` (the report's dict) feeds the pass@k bars; when None it is rebuilt from the eval_* records.
    """
    run_dir = Path(run_dir)
    out_dir = run_dir / PLOTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    records = read_metrics(run_dir)
    results = results if results is not None else results_from_metrics(records)
    makers = {
        SFT_LOSS_PNG: lambda p: plot_sft_loss(records, p),
        PEAR_DIAGNOSTICS_PNG: lambda p: plot_pear_diagnostics(records, p),
        PEAR_HISTOGRAM_PNG: lambda p: plot_weight_histogram(read_histograms(run_dir), p),
        RL_PNG: lambda p: plot_rl(records, p),
        PASS_AT_K_PNG: lambda p: plot_pass_at_k(results, p),
    }
    written = []
    for name, make in makers.items():
        path = out_dir / name
        path.unlink(missing_ok=True)  # a plot that has no data this time must not survive from an earlier call
        if make(path) is not None:
            written.append(path)
    return written
