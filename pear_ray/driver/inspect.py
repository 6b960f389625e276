"""Before any training: how PEAR would weight the job's SFT data under the student as it is (`pear-ray inspect`).

The student scores the scored SFT data (data/sft.parquet) teacher-forced, in process, and the PEAR weights of
every level are summed up overall, by response length and by behaviour source: a user learns how far a teacher's
data sits from their student before paying for SFT and RL. Writes inspect.json and plots/inspect.png.

The first response token gets figures of its own: in the two-style world it is where the behaviour policy chooses a
worked trace or a bare answer, and its weight (the product of the later tokens' clipped ratios at the token level)
is how strongly PEAR steers that choice. The gate before SFT (driver/gate.py) reads the same figures.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pear_ray.config import JobConfig
from pear_ray.data import schema
from pear_ray.data.tensors import to_tensors
from pear_ray.driver.run import RunState, finished_stages, opened_run
from pear_ray.engines.hf_scorer import HfScorer
from pear_ray.models import resolve_model
from pear_ray.objectives import PearSft, pear_loss, pear_weights
from pear_ray.stages.score import run_score
from pear_ray.tracking.plots import PLOTS_DIR, save_figure, subplots

log = logging.getLogger(__name__)

INSPECT_JSON = "inspect.json"
INSPECT_PNG = "inspect.png"
LEVELS = ("sequence", "token", "block")  # level "none" weights every token 1: nothing to inspect
QUANTILES = (5, 25, 50, 75, 95)
FIRST_BUCKET_TOKENS = 8  # response-length buckets 1-8, 9-16, 17-32, ... tokens (doubling)
HISTOGRAM_BINS = 60
ALL = "all"
UNLABELLED_SOURCE = "(none)"  # a row whose source is null
STUDENT_LOGPROBS = "student_logprobs"  # this stage's own per-token column, not in the schema
DEFAULT_LEVEL = "token"  # the verdict's level when the job trains canonical SFT only

# Verdict thresholds, on the response tokens of the whole data set.
CLOSE_ESS_FRACTION = 0.8  # at or above, with at most CLOSE_FLOOR_FRACTION at the floor: close to the student
CLOSE_FLOOR_FRACTION = 0.01
FAR_FLOOR_FRACTION = 0.25  # at or above: far from the student
NOTABLE_CEILING_FRACTION = 0.05  # at or above: the ceiling is worth a mention
SOURCE_SHIFT_RATIO = 1.25  # one source's mean (or first-token) weight this many times another's: PEAR favours it


def weight_figures(table: pa.Table, student_logprobs: pa.ChunkedArray | list, pear: PearSft,
                   levels: Sequence[str] = LEVELS) -> dict:
    """PEAR's weights on `table` (prompt_ids, response_ids, behavior_logprobs, optional source) with the student's
    log-probs (one list per row), summed up per level of `levels` with the job's gamma, block size and clips.

    Per level: `overall`, `by_length` and, when the data has several sources, `by_source` figures (see `_stats`),
    then the `first_token_ratio` of the sources with the highest and the lowest first-token weight; a `histogram`
    of the weights and the `mean_weight_by_position` in the response, for `all` and per source.
    """
    table = schema.append_column(table, STUDENT_LOGPROBS, student_logprobs, type=schema.LOGPROBS_TYPE)
    grid = to_tensors(table, pad_id=0, columns=(schema.BEHAVIOR_LOGPROBS, STUDENT_LOGPROBS))
    student, behavior, mask = grid[STUDENT_LOGPROBS], grid[schema.BEHAVIOR_LOGPROBS], grid["response_mask"]
    every_row = {ALL: torch.ones(table.num_rows, dtype=torch.bool)}
    sources = _source_rows(table)
    row_groups = {"overall": every_row, "by_length": _length_rows(mask.sum(1)), "by_source": sources}
    series = {**every_row, **sources}  # what the histogram and the position curve show
    position = (mask.long().cumsum(1) - 1)[mask].numpy()  # each response token's index in its response
    lo, hi = pear.log_weight_clip
    log_edges = np.linspace(lo, hi, HISTOGRAM_BINS + 1)
    figures_by_level = {}
    for level in levels:
        settings = dict(level=level, gamma=pear.gamma, block_size=pear.block_size, delta_clip=pear.delta_clip,
                        log_weight_clip=pear.log_weight_clip)
        weights = pear_weights(student, behavior, mask, **settings)
        figures = {kind: {name: _stats(student, behavior, mask & rows[:, None], weights, settings)
                          for name, rows in groups.items()}
                   for kind, groups in row_groups.items() if groups}
        if sources:
            ranked = sorted(sources, key=lambda name: figures["by_source"][name]["first_token_weight"])
            figures["first_token_ratio"] = first_token_ratio(figures["by_source"], ranked[-1], ranked[0])
        histogram, by_position = {}, {}
        for name, rows in series.items():
            tokens = rows[:, None].expand_as(mask)[mask].numpy()
            w = weights[mask].double().numpy()[tokens]
            counts = np.histogram(np.clip(np.log(w), lo, hi), bins=log_edges)[0]
            histogram[name] = (counts / w.size).tolist()
            by_position[name] = _mean_by_position(w, position[tokens])
        figures["histogram"] = {"edges": np.exp(log_edges).tolist(), "fractions": histogram}
        figures["mean_weight_by_position"] = by_position
        figures_by_level[level] = figures
    return {
        "rows": table.num_rows,
        "tokens": int(mask.sum()),
        "settings": {"gamma": pear.gamma, "block_size": pear.block_size, "delta_clip": list(pear.delta_clip),
                     "log_weight_clip": list(pear.log_weight_clip)},
        "levels": figures_by_level,
    }


def _stats(student, behavior, mask, weights, settings) -> dict:
    """One group's figures: the objective's own diagnostics (mean weight, ESS fraction, fractions at the floor and
    ceiling, mean log-ratio before clipping), the weights' quantiles, over the group's response tokens, and the mean
    weight of its rows' first response token."""
    _, diagnostics = pear_loss(student, behavior, mask, **settings)
    quantiles = np.percentile(weights[mask].double().numpy(), QUANTILES)
    rows = mask.any(1)
    first = weights.gather(1, mask.int().argmax(1, keepdim=True))[:, 0]  # argmax: the first True of each row
    return {"rows": int(rows.sum()), **diagnostics.as_dict(),
            **{f"p{q}": float(v) for q, v in zip(QUANTILES, quantiles)},
            "first_token_weight": float(first[rows].double().mean())}


def first_token_ratio(by_source: dict, numerator: str, denominator: str) -> dict:
    """The mean weight of the first response token in `numerator`'s rows over that in `denominator`'s, from a
    level's `by_source` figures: how much more PEAR weights starting like the one than like the other."""
    return {"numerator": numerator, "denominator": denominator,
            "ratio": by_source[numerator]["first_token_weight"] / by_source[denominator]["first_token_weight"]}


def _length_rows(lengths: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows by response length in buckets 1-8, 9-16, 17-32, ... tokens; only the non-empty buckets."""
    upper = np.maximum(FIRST_BUCKET_TOKENS, 2 ** np.ceil(np.log2(lengths.numpy()))).astype(int)
    return {f"{1 if top == FIRST_BUCKET_TOKENS else top // 2 + 1}-{top}": torch.from_numpy(upper == top)
            for top in np.unique(upper)}


def _source_rows(table: pa.Table) -> dict[str, torch.Tensor]:
    """Rows by behaviour source, when the data has several; else nothing."""
    if schema.SOURCE not in table.column_names:
        return {}
    sources = np.array(pc.fill_null(table.column(schema.SOURCE), UNLABELLED_SOURCE).to_pylist())
    names = sorted(set(sources))
    return {name: torch.from_numpy(sources == name) for name in names} if len(names) > 1 else {}


def _mean_by_position(weights: np.ndarray, position: np.ndarray) -> list[float | None]:
    """Mean weight at each position of the response (None where no response of the series is that long)."""
    count = np.bincount(position)
    total = np.bincount(position, weights=weights)
    return [float(s / c) if c else None for s, c in zip(total, count)]


def verdict(figures: dict, level: str) -> list[str]:
    """One line on how far the data sits from the student at `level`, and, when the data has several sources, one
    on their mean weights and one on their first response token's."""
    overall = figures["levels"][level]["overall"][ALL]
    ess, floor, ceiling = overall["ess_fraction"], overall["frac_at_floor"], overall["frac_at_ceiling"]
    head = f"{level} level: ESS {ess:.2f} of tokens, {floor:.0%} at the floor"
    if ceiling >= NOTABLE_CEILING_FRACTION:
        head += f", {ceiling:.0%} at the ceiling"
    if floor >= FAR_FLOOR_FRACTION:
        what = "the teacher is far from this student; " + (
            "whole responses drop to the floor weight, so PEAR will train mostly on the responses the student "
            "already finds likely" if level == "sequence" else
            "the early tokens of long responses drop to the floor weight, so PEAR will train mostly on the ends "
            "of responses and on short ones")
    elif ess >= CLOSE_ESS_FRACTION and floor <= CLOSE_FLOOR_FRACTION:
        what = "the data sits close to the student; PEAR will weight it almost like canonical SFT"
    else:
        what = (f"the data sits some way from the student; PEAR will weight it unevenly (as if it trained on "
                f"{ess:.0%} of the tokens)")
    lines = [f"{head}: {what}"]
    by_source = figures["levels"][level].get("by_source")
    if by_source:
        ranked = sorted(by_source, key=lambda name: by_source[name]["mean_weight"])
        low, high = ranked[0], ranked[-1]
        low_w, high_w = by_source[low]["mean_weight"], by_source[high]["mean_weight"]
        pair = f"source '{low}' gets mean weight {low_w:.2f} vs '{high}' {high_w:.2f}"
        shift = (f"PEAR will shift the student toward '{high}'" if high_w >= SOURCE_SHIFT_RATIO * low_w
                 else "PEAR will weight the sources alike")
        lines.append(f"{level} level: {pair}: {shift}")
        first = figures["levels"][level]["first_token_ratio"]
        high, low, ratio = first["numerator"], first["denominator"], first["ratio"]
        pair = (f"the first response token gets weight {by_source[high]['first_token_weight']:.3g} in '{high}' rows "
                f"vs {by_source[low]['first_token_weight']:.3g} in '{low}' rows ({ratio:.3g}x)")
        shift = (f"PEAR will steer how responses start toward '{high}'" if ratio >= SOURCE_SHIFT_RATIO
                 else "PEAR will weight how responses start alike")
        lines.append(f"{level} level: {pair}: {shift}")
    return lines


def fidelity_notes(job: JobConfig) -> list[str]:
    """What the data's behaviour log-probs leave out, given how the job wrote the data (a line each)."""
    behavior = job.models.behavior
    writes_and_filters = (job.data.sft is None and behavior is not None and behavior.scripted is None
                          and job.score.keep == "correct")
    if not writes_and_filters:
        return []
    return ["note: the behaviour model kept only its correct samples (score.keep: correct), but their stored "
            "log-probs are unconditional: each response's summed log-ratio is too high by -log P(correct | prompt), "
            "which the data does not record"]


COLUMNS = (  # header, figure, format
    ("rows", "rows", "{:d}"), ("tokens", "num_tokens", "{:d}"), ("mean w", "mean_weight", "{:.3g}"),
    *((f"p{q}", f"p{q}", "{:.3g}") for q in QUANTILES),
    ("ESS", "ess_fraction", "{:.2f}"), ("floor", "frac_at_floor", "{:.1%}"), ("ceiling", "frac_at_ceiling", "{:.1%}"),
    ("log-ratio", "mean_log_ratio", "{:+.3f}"), ("first w", "first_token_weight", "{:.3g}"),
)
GROUP_LABELS = {"overall": "", "by_length": "length ", "by_source": "source "}


def format_table(figures: dict) -> str:
    """The figures as an aligned text table, one line per level and group, then a line per level on the sources'
    first-token weight ratio when the data has several sources."""
    rows = [["level", "group", *(header for header, _, _ in COLUMNS)]]
    for level, data in figures["levels"].items():
        groups = [(label + name, stats) for kind, label in GROUP_LABELS.items()
                  for name, stats in data.get(kind, {}).items()]
        for index, (group, stats) in enumerate(groups):
            rows.append([level if index == 0 else "", group, *(fmt.format(stats[key]) for _, key, fmt in COLUMNS)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) if i < 2 else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(row, widths))) for row in rows]
    ratios = [(level, data["first_token_ratio"]) for level, data in figures["levels"].items()
              if "first_token_ratio" in data]
    lines += [""] if ratios else []
    lines += [f"{level} level: first-token weight ratio {first['numerator']}/{first['denominator']} "
              f"{first['ratio']:.3g}" for level, first in ratios]
    return "\n".join(lines)


def plot_inspect(figures: dict, path: Path) -> Path:
    """Per level: the weight histogram (top) and the mean weight by position in the response (bottom), for all
    tokens and per source."""
    levels = list(figures["levels"])
    fig, axes = subplots(2, len(levels), (4.8 * len(levels), 7.6))
    floor, ceiling = np.exp(figures["settings"]["log_weight_clip"])
    for column, level in enumerate(levels):
        data = figures["levels"][level]
        overall = data["overall"][ALL]
        top, bottom = axes[0, column], axes[1, column]
        edges = np.asarray(data["histogram"]["edges"])
        for name, fractions in data["histogram"]["fractions"].items():
            top.stairs(fractions, edges, label=name, linewidth=1.6, **_all_style(name))
        means = data["mean_weight_by_position"]
        for name, values in means.items():
            bottom.plot(np.arange(1, len(values) + 1), np.array(values, dtype=float), label=name, **_all_style(name))
        for bound in (floor, ceiling):
            top.axvline(bound, color="grey", linestyle=":", linewidth=1)
            bottom.axhline(bound, color="grey", linestyle=":", linewidth=1)
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
        if column == 0 and len(means) > 1:
            top.legend(title="source", fontsize="small")
        top.set_xscale("log")
        top.set(title=f"{level}: ESS {overall['ess_fraction']:.2f}, {overall['frac_at_floor']:.0%} at floor, "
                      f"{overall['frac_at_ceiling']:.0%} at ceiling",
                xlabel="weight w (log scale; dotted: the clip)", ylabel="fraction of response tokens")
        bottom.set_yscale("log")
        bottom.set(title=f"{level}: mean weight by position", xlabel="position in the response (token)",
                   ylabel="mean weight (log scale)")
    settings = figures["settings"]
    fig.suptitle(f"PEAR weights of the SFT data under the student before training ({figures['rows']} rows; "
                 f"gamma {settings['gamma']}, block {settings['block_size']})")
    return save_figure(fig, path)


def _all_style(name: str) -> dict:
    """The `all` series in black, so sources drawn over it stand out."""
    return {"color": "black", "linestyle": "--"} if name == ALL else {}


def verdict_levels(job: JobConfig) -> list[str]:
    """The PEAR levels the job trains, or the default level when it trains canonical SFT only."""
    levels = dict.fromkeys(variant.pear_level for variant in job.sft.trained_variants)
    return [level for level in levels if level != "none"] or [DEFAULT_LEVEL]


def scored_data(job: JobConfig, run_dir: str | Path, prior_dir: Path | None = None) -> tuple[Path, Path]:
    """The student SFT would start from and the run folder's scored SFT data. Stages not run yet (the student's
    prior, score) run here and are recorded in state.json, so a later `pear-ray run` reuses them."""
    done = finished_stages(run_dir)
    if "score" in done and (job.models.student.prior is None or "prior" in done):
        state = RunState(run_dir, job)
        student = state.output_of("prior") if "prior" in done else \
            resolve_model(job.models.student, state.dir / "models" / "student")
        return student, state.output_of("score")
    with opened_run(job, run_dir, prior_dir) as (run, state):
        return run.student, state.output("score", lambda: run_score(run))


def data_figures(student: Path, data: Path, pear: PearSft, levels: Sequence[str] = LEVELS) -> dict:
    """`weight_figures` of the scored SFT data at `data`, scored teacher-forced under `student` in this process."""
    columns = [schema.PROMPT_IDS, schema.RESPONSE_IDS, schema.BEHAVIOR_LOGPROBS]
    columns += [schema.SOURCE] if schema.SOURCE in pq.read_schema(data).names else []
    table = schema.validate(pq.read_table(data, columns=columns), required=columns[:3], source=str(data))
    log.info("scoring %d rows of %s under the student %s", table.num_rows, data, student)
    return weight_figures(table, HfScorer(student).logprobs(table), pear, levels)


def run_inspect(job: JobConfig, run_dir: Path) -> tuple[dict, Path, Path]:
    """Score the job's SFT data under the base student, write inspect.json and plots/inspect.png; returns the
    figures (with the verdict) and both paths."""
    run_dir.mkdir(parents=True, exist_ok=True)
    student, data = scored_data(job, run_dir)
    figures = data_figures(student, data, job.sft.pear)
    figures.update(data=str(data), student=str(student),
                   verdict=[*(line for level in verdict_levels(job) for line in verdict(figures, level)),
                            *fidelity_notes(job)])
    json_path = run_dir / INSPECT_JSON
    json_path.write_text(json.dumps(figures, indent=1))
    (run_dir / PLOTS_DIR).mkdir(exist_ok=True)
    return figures, json_path, plot_inspect(figures, run_dir / PLOTS_DIR / INSPECT_PNG)
