"""run_dir/report.md: the experiment's table (canonical SFT vs PEAR levels as the RL start, pass@k after SFT and
after RL, each variant's mean PEAR weight, and for a task with response styles the share of its first style), an
honest noise note, the plots, and the final PEAR diagnostics of each variant."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pear_ray import atomic
from pear_ray.tracking.metrics import first_style_share, read_metrics, variant_name
from pear_ray.tracking.plots import (
    ALL_PLOTS,
    EVAL_STAGE_LABELS,
    PASS_AT_K_PNG,
    PEAR_DIAGNOSTICS,
    PEAR_DIAGNOSTICS_PNG,
    PEAR_HISTOGRAM_PNG,
    PLOTS_DIR,
    RL_PNG,
    SFT_LOSS_PNG,
    order_variants,
    pass_at_k_names,
    plot_run,
    share_label,
)

REPORT_FILE = "report.md"
CONFIG_FILE = "config.yaml"
BASELINE = "none"
DASH = "–"
NEAR_ZERO = 0.05  # every score below this: the model solves (almost) nothing, nothing to compare
FLOOR_WARNING = 0.5  # more than half the tokens' weights at the floor
ESS_WARNING = 0.1  # effective sample size under a tenth of the tokens
PLOT_CAPTIONS = {
    PASS_AT_K_PNG: "pass@k after SFT and after RL",
    SFT_LOSS_PNG: "SFT loss",
    PEAR_DIAGNOSTICS_PNG: "PEAR weight diagnostics",
    PEAR_HISTOGRAM_PNG: "PEAR weight histogram",
    RL_PNG: "RL reward and response length",
}

Results = Mapping[str, Mapping[str, Mapping[str, float]]]


def _score(results: Results, variant: str, stage: str, name: str) -> float | None:
    value = results.get(variant, {}).get(stage, {}).get(name)
    return None if value is None or not math.isfinite(value) else float(value)


def _fmt(value: float | None) -> str:
    return DASH if value is None else f"{value:.3f}"


def _fmt_delta(delta: float | None, margin: float | None) -> str:
    if delta is None:
        return DASH
    text = f"{delta:+.3f}"
    return f"({text})" if margin is not None and abs(delta) < margin else text


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


WEIGHT_NOTE = ("It is not a learning-rate factor: a scale common to every batch cancels in AdamW's update, and only "
               "gradient clipping, which acts before AdamW, sees it. PEAR changes how much tokens and rows count "
               "against each other within a batch and, with `sft.pear.normalize: tokens` (the default), how much "
               "batches count against each other; `normalize: weights` makes batches count alike, as in canonical "
               "SFT.")


def noise_margin(results: Results) -> tuple[float | None, int | None]:
    """Worst-case 95% half-width of one pass@k score, 1/sqrt(N) for N eval prompts (a mean of N values in [0, 1]
    has variance at most 1/(4N)); uses the smallest "num_prompts" in results, None when none is recorded."""
    counts = [int(v["num_prompts"]) for stages in results.values() for v in stages.values() if v.get("num_prompts")]
    if not counts:
        return None, None
    n = min(counts)
    return 1 / math.sqrt(n), n


def mean_pear_weights(records: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Each variant's logged `mean_weight` averaged over its SFT steps: how far the weights discount the data on the
    whole, shown next to every result (what it does not mean, an effective learning rate: `WEIGHT_NOTE`)."""
    weights: dict[str, list[float]] = {}
    for rec in records:
        if rec.get("stage") == "sft" and rec.get("mean_weight") is not None:
            weights.setdefault(variant_name(rec.get("variant")), []).append(float(rec["mean_weight"]))
    return {variant: math.fsum(values) / len(values) for variant, values in weights.items()}


def _results_section(results: Results, mean_weights: Mapping[str, float]) -> list[str]:
    variants = order_variants(results)
    names = pass_at_k_names(results)
    if not variants or not names:
        return ["No pass@k results were recorded for this run.", ""]
    margin, n = noise_margin(results)
    label = {BASELINE: f"{BASELINE} (canonical SFT, baseline)"}
    share = first_style_share(name for stages in results.values() for values in stages.values() for name in values)
    share_stages = tuple(EVAL_STAGE_LABELS) if share else ()

    head = ["SFT variant", "mean PEAR weight (SFT)"] + [f"{k} after SFT" for k in names]
    head += [f"{k} after RL" for k in names]
    head += [f"Δ {k} (RL − SFT)" for k in names]
    head += [f"{share_label(share)} {EVAL_STAGE_LABELS[stage]}" for stage in share_stages]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    deltas: list[float] = []
    for v in variants:
        sft = [_score(results, v, "sft", k) for k in names]
        rl = [_score(results, v, "rl", k) for k in names]
        change = [_delta(a, b) for a, b in zip(sft, rl)]
        deltas += [d for d in change if d is not None]
        cells = [label.get(v, v), _fmt(mean_weights.get(v))] + [_fmt(x) for x in sft + rl]
        cells += [_fmt_delta(d, margin) for d in change]
        cells += [_fmt(_score(results, v, stage, share)) for stage in share_stages]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"The mean PEAR weight is averaged over the variant's SFT steps. {WEIGHT_NOTE}", ""]
    if share:
        lines += [f"The {share_label(share)} is the fraction of the eval samples written in the task's first "
                  f"response style (`{share}` in the metrics; per prompt, the style counts in "
                  "`eval/<stage>-<variant>.parquet`).", ""]

    others = [v for v in variants if v != BASELINE]
    if BASELINE in results and others:
        head = ["SFT variant"] + [f"Δ {k} vs canonical, {when}" for when in ("after SFT", "after RL") for k in names]
        lines += ["Difference from canonical SFT (`none`), same eval:", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
        for v in others:
            diffs = [_delta(_score(results, BASELINE, stage, k), _score(results, v, stage, k))
                     for stage in ("sft", "rl") for k in names]
            deltas += [d for d in diffs if d is not None]
            lines.append("| " + " | ".join([v] + [_fmt_delta(d, margin) for d in diffs]) + " |")
        lines.append("")

    lines += _noise_note(results, deltas, margin, n)
    return lines


def _noise_note(results: Results, deltas: list[float], margin: float | None, n: int | None) -> list[str]:
    scores = [x for stages in results.values() for values in stages.values()
              for name, x in values.items() if name.startswith("pass@") and math.isfinite(x)]
    notes = []
    if margin is None:
        notes.append("**Noise:** the number of eval prompts was not recorded, so the noise level of these scores is "
                     "unknown. With a tiny model and a few dozen prompts, differences of several points are noise.")
    else:
        notes.append(f"**Noise:** each score is a mean over N = {n} held-out prompts, so its 95% interval is up to "
                     f"±{margin:.3f} (1/√N). Differences smaller than that are shown in parentheses and mean nothing.")
        if deltas and all(abs(d) < margin for d in deltas):
            notes.append("**Every difference in these tables is within noise: this run cannot tell the variants "
                         "apart.** It shows that the pipeline runs end to end, not whether PEAR helps; that needs a "
                         "real model, more prompts and several seeds.")
    if scores and max(scores) < NEAR_ZERO:
        notes.append(f"**Every score is below {NEAR_ZERO}: the model solves almost nothing**, so the comparison is "
                     "at the floor and says nothing about the variants.")
    return [" ".join(notes) if len(notes) == 1 else "\n".join(f"- {note}" for note in notes), ""]


def _diagnostics_section(run_dir: Path) -> list[str]:
    last: dict[str, Mapping[str, Any]] = {}
    for rec in read_metrics(run_dir):
        if rec.get("stage") == "sft" and any(name in rec for name in PEAR_DIAGNOSTICS):
            last[variant_name(rec.get("variant"))] = rec
    if not last:
        return ["No PEAR diagnostics were logged (no SFT stage in this run).", ""]
    head = ["SFT variant", "last SFT step", "loss", *PEAR_DIAGNOSTICS.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    warnings = []
    for v in order_variants(last):
        rec = last[v]
        values = [rec.get(name) for name in ("loss", *PEAR_DIAGNOSTICS)]
        cells = [v, str(rec["step"])] + [DASH if x is None else f"{x + 0.0:.4g}" for x in values]  # no "-0"
        lines.append("| " + " | ".join(cells) + " |")
        floor, ess = rec.get("frac_at_floor"), rec.get("ess_fraction")
        if floor is not None and floor > FLOOR_WARNING:
            warnings.append(f"- `{v}`: {floor:.0%} of the tokens' weights are at the floor: the teacher data is far "
                            "from the student late in the traces, so those tokens barely train.")
        if ess is not None and ess < ESS_WARNING:
            warnings.append(f"- `{v}`: the effective sample size is {ess:.1%} of the tokens: a few tokens carry most "
                            "of the loss, so the SFT gradient is noisy.")
    return lines + [""] + (warnings + [""] if warnings else [])


def write_report(run_dir: str | Path, results: Results, *, seed: int, job_name: str,
                 extra: Mapping[str, Any] | None = None, make_plots: bool = True, location: str | None = None) -> Path:
    """Write run_dir/report.md and return its path.

    results: {variant: {stage: {metric: value}}}
        variant  an SFT level ("none" = canonical SFT, "sequence", "block", "token", ...), or "default"
        stage    "sft" (pass@k of the SFT checkpoint) and/or "rl" (after RL from it); either may be missing ("–")
        metric   "pass@{k}" for each k evaluated, plus optional "num_prompts" (eval prompts, for the noise note) and
                 "share_<style>" (the first one is shown, e.g. "share_trace": the trace share)
      e.g. {"none": {"sft": {"pass@1": 0.21, "pass@8": 0.55, "num_prompts": 64}, "rl": {...}}, "token": {...}}
      `metrics.results_from_metrics(read_metrics(run_dir))` rebuilds it from the logged eval_* records.
    extra: further header lines (student, teacher, task, n samples...), shown as "key: value".
    make_plots: (re)draw the plots first; otherwise embed whatever PNGs run_dir/plots/ already holds.
    location: where the run folder lives when run_dir is only its local copy (a bucket's URL), named in the header.
    """
    run_dir = Path(run_dir)
    if make_plots:
        plot_run(run_dir, results)
    config_line = f"[{CONFIG_FILE}]({CONFIG_FILE})" if (run_dir / CONFIG_FILE).exists() else "not in the run folder"
    lines = [
        f"# pear_ray report: {job_name}",
        "",
        f"- job: `{job_name}`",
        f"- seed: {seed}",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- config: {config_line}",
        f"- run folder: `{location or run_dir.resolve()}`",
        *(f"- {key}: {value}" for key, value in (extra or {}).items()),
        "",
        "## Results: canonical SFT vs PEAR-SFT as the RL starting point",
        "",
        *_results_section(results, mean_pear_weights(read_metrics(run_dir))),
        "## Plots",
        "",
    ]
    plots = [name for name in ALL_PLOTS if (run_dir / PLOTS_DIR / name).exists()]
    ordered = sorted(plots, key=list(PLOT_CAPTIONS).index)
    lines += [f"![{PLOT_CAPTIONS[name]}]({PLOTS_DIR}/{name})\n" for name in ordered] or ["No plots (no metrics).", ""]
    lines += ["## PEAR diagnostics at the end of SFT", "", *_diagnostics_section(run_dir)]
    path = run_dir / REPORT_FILE
    atomic.write_bytes(path, "\n".join(lines).rstrip("\n").encode() + b"\n")
    return path


def results_summary(report: str | Path) -> str:
    """A report's results for the console (a run's or an experiment's report.md): its sections before the plots."""
    text = Path(report).read_text()
    start, end = text.find("\n## "), text.find("\n## Plots")
    return text[start + 1:end if end >= 0 else None].strip()
