"""`pear-ray inspect`: PEAR's weights on the SFT data under the untrained student, per level, length and source, and
at the first response token."""

import json
import math
import statistics

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from pear_ray.cli import app
from pear_ray.config import load_job
from pear_ray.driver.inspect import LEVELS, QUANTILES, fidelity_notes, format_table, verdict, weight_figures
from pear_ray.engines.hf_scorer import HfScorer
from pear_ray.objectives import PearSft

SETTINGS = PearSft(gamma=0.9, block_size=4, delta_clip=(-0.1, 0.2), log_weight_clip=(-1.0, 1.0))
# (source, response length T, raw log-ratio lt - lb on every token). With these settings the d of a row is
# clip(raw) = 0, -0.1, 0.2, -0.05, and no log-weight falls within 0.02 of a clip bound (float32 stays on one side).
ROWS = [("trace", 3, 0.0), ("bare", 11, -1.0), ("trace", 20, 1.0), ("bare", 5, -0.05)]
BEHAVIOR = -1.5


def fixed_table():
    table = pa.table({
        "prompt_ids": [[1, 2]] * len(ROWS),
        "response_ids": [[7] * length for _, length, _ in ROWS],
        "behavior_logprobs": pa.array([[BEHAVIOR] * length for _, length, _ in ROWS], type=pa.list_(pa.float32())),
        "source": [source for source, _, _ in ROWS],
    })
    student = [[BEHAVIOR + raw] * length for _, length, raw in ROWS]
    return table, student


def expected_log_g(level, length, raw, settings=SETTINGS):
    """The PEAR formulas for a row whose tokens share one log-ratio: log G_t for t = 1..T."""
    d = min(max(raw, settings.delta_clip[0]), settings.delta_clip[1])
    if level == "sequence":
        return [d * length] * length
    ends = [t if level == "token" else min(math.ceil(t / settings.block_size) * settings.block_size, length)
            for t in range(1, length + 1)]
    return [(length - end) * (math.log(settings.gamma) + d) for end in ends]


def expected_stats(level, rows):
    """A group's figures from its rows' tokens, with the statistics module (not numpy) for the quantiles."""
    log_g, raw, first = [], [], []
    for _, length, row_raw in rows:
        row_log_g = expected_log_g(level, length, row_raw)
        log_g += row_log_g
        raw += [row_raw] * length
        first.append(row_log_g[0])
    lo, hi = SETTINGS.log_weight_clip
    w = [math.exp(min(max(g, lo), hi)) for g in log_g]
    n = len(w)
    cuts = statistics.quantiles(w, n=100, method="inclusive")  # cuts[q - 1] is the q-th percentile
    return {
        "rows": len(rows), "num_tokens": n, "mean_weight": sum(w) / n,
        "ess_fraction": sum(w) ** 2 / (n * sum(x * x for x in w)),
        "frac_at_floor": sum(g <= lo for g in log_g) / n, "frac_at_ceiling": sum(g >= hi for g in log_g) / n,
        "mean_log_ratio": sum(raw) / n, **{f"p{q}": cuts[q - 1] for q in QUANTILES},
        "first_token_weight": statistics.fmean(math.exp(min(max(g, lo), hi)) for g in first),
    }


EXPECTED_GROUPS = {
    "overall": {"all": ROWS},
    "by_length": {"1-8": [ROWS[0], ROWS[3]], "9-16": [ROWS[1]], "17-32": [ROWS[2]]},
    "by_source": {"bare": [ROWS[1], ROWS[3]], "trace": [ROWS[0], ROWS[2]]},
}


@pytest.mark.parametrize("level", LEVELS)
def test_figures_match_an_independent_computation(level):
    table, student = fixed_table()
    figures = weight_figures(table, student, SETTINGS)
    assert (figures["rows"], figures["tokens"]) == (4, 39)
    got = figures["levels"][level]
    for kind, groups in EXPECTED_GROUPS.items():
        assert list(got[kind]) == list(groups), kind  # only the non-empty buckets, in order
        for name, rows in groups.items():
            expected = expected_stats(level, rows)
            assert {key: got[kind][name][key] for key in expected} == pytest.approx(expected, rel=1e-5, abs=1e-7), \
                (kind, name)


def test_the_fixed_table_reaches_both_clips_and_splits_the_sources():
    """The comparison above is only a strong check if floor, ceiling and the source split all show."""
    table, student = fixed_table()
    token = weight_figures(table, student, SETTINGS)["levels"]["token"]
    assert token["overall"]["all"]["frac_at_floor"] == pytest.approx(6 / 39)  # row 1: T - t >= 5
    assert token["overall"]["all"]["frac_at_ceiling"] == pytest.approx(9 / 39)  # row 2: T - t >= 11
    assert token["by_source"]["bare"]["mean_weight"] < 1 < token["by_source"]["trace"]["mean_weight"]


def test_histogram_and_position_curve():
    table, student = fixed_table()
    token = weight_figures(table, student, SETTINGS)["levels"]["token"]
    histogram = token["histogram"]
    assert len(histogram["edges"]) == len(histogram["fractions"]["all"]) + 1
    assert histogram["edges"][0] == pytest.approx(math.exp(-1.0)) and histogram["edges"][-1] == pytest.approx(math.e)
    for name in ("all", "bare", "trace"):
        assert sum(histogram["fractions"][name]) == pytest.approx(1.0)
    overall = token["overall"]["all"]  # no weight sits just inside a clip bound: the end bins hold the clipped ones
    assert histogram["fractions"]["all"][0] == pytest.approx(overall["frac_at_floor"])
    assert histogram["fractions"]["all"][-1] == pytest.approx(overall["frac_at_ceiling"])
    w = {index: [math.exp(min(max(g, -1.0), 1.0)) for g in expected_log_g("token", length, raw)]
         for index, (_, length, raw) in enumerate(ROWS)}
    trace = token["mean_weight_by_position"]["trace"]  # rows 0 (T=3) and 2 (T=20)
    assert len(trace) == 20
    assert trace[0] == pytest.approx((w[0][0] + w[2][0]) / 2, rel=1e-5)
    assert trace[10] == pytest.approx(w[2][10], rel=1e-5)
    bare = token["mean_weight_by_position"]["bare"]  # rows 1 (T=11) and 3 (T=5): nothing past position 11
    assert bare[4] == pytest.approx((w[1][4] + w[3][4]) / 2, rel=1e-5)
    assert len(bare) == 11
    assert token["mean_weight_by_position"]["all"][15] == pytest.approx(w[2][15], rel=1e-5)


def test_one_source_gives_no_source_split():
    table, student = fixed_table()
    table = table.set_column(3, "source", pa.array(["trace"] * len(ROWS)))
    figures = weight_figures(table, student, SETTINGS)
    assert "by_source" not in figures["levels"]["token"]
    assert list(figures["levels"]["token"]["mean_weight_by_position"]) == ["all"]
    assert len(verdict(figures, "token")) == 1


def test_table_has_a_line_per_level_and_group_and_one_per_first_token_ratio():
    table, student = fixed_table()
    figures = weight_figures(table, student, SETTINGS)
    lines = format_table(figures).splitlines()
    assert len(lines) == 1 + len(LEVELS) * 6 + 1 + len(LEVELS)  # header; all, 3 lengths, 2 sources; gap; ratios
    assert lines[0].split()[:3] == ["level", "group", "rows"] and lines[0].endswith("first w")
    assert lines[1].split()[:4] == ["sequence", "all", "4", "39"]
    assert lines[7].split()[:2] == ["token", "all"]
    first = figures["levels"]["token"]["first_token_ratio"]
    assert lines[7].split()[-1] == f"{figures['levels']['token']['overall']['all']['first_token_weight']:.3g}"
    assert lines[-2] == f"token level: first-token weight ratio trace/bare {first['ratio']:.3g}"


def two_style_rows(rows: list[tuple[str, list[float]]], settings: PearSft, behavior: float = -0.7) -> dict:
    """Figures of rows (source, raw log-ratio lt - lb of each response token) under `settings`."""
    table = pa.table({
        "prompt_ids": [[1, 2]] * len(rows),
        "response_ids": [[7] * len(raw) for _, raw in rows],
        "behavior_logprobs": pa.array([[behavior] * len(raw) for _, raw in rows], type=pa.list_(pa.float32())),
        "source": [source for source, _ in rows],
    })
    return weight_figures(table, [[behavior + r for r in raw] for _, raw in rows], settings)


# Two traces the student follows after the style choice, two bare answers whose digits it cannot predict.
STYLE_ROWS = [("trace", [-0.1, 0.0, 0.0, 0.0, 0.0]), ("trace", [-0.1, 0.1, 0.5, 0.0]),
              ("bare", [-0.1, -2.0, -2.0, 0.0]), ("bare", [-0.1, -0.05, 0.0])]


@pytest.mark.parametrize("lower_clip", [-0.08, -1.0])
def test_first_token_weight_is_the_product_of_the_later_clipped_ratios(lower_clip):
    """At the token level log G_1 = (T - 1) log gamma + sum_{j > 1} clip(raw_j): by hand, per row, then the mean
    per source and the ratio of the larger to the smaller; a wider lower clip separates the styles more."""
    settings = PearSft(delta_clip=(lower_clip, 0.3))  # gamma 0.999, the paper's default
    log_gamma = math.log(0.999)
    log_g1 = {"trace": [4 * log_gamma, 3 * log_gamma + 0.1 + 0.3],  # 0.5 clipped to 0.3
              "bare": [3 * log_gamma + 2 * lower_clip, 2 * log_gamma + max(-0.05, lower_clip)]}
    first = {source: statistics.fmean(math.exp(g) for g in values) for source, values in log_g1.items()}
    token = two_style_rows(STYLE_ROWS, settings)["levels"]["token"]
    for source in ("trace", "bare"):
        assert token["by_source"][source]["first_token_weight"] == pytest.approx(first[source], rel=1e-5)
    assert token["overall"]["all"]["first_token_weight"] == pytest.approx(
        statistics.fmean(math.exp(g) for values in log_g1.values() for g in values), rel=1e-5)
    assert token["first_token_ratio"]["numerator"] == "trace" and token["first_token_ratio"]["denominator"] == "bare"
    assert token["first_token_ratio"]["ratio"] == pytest.approx(first["trace"] / first["bare"], rel=1e-5)
    # the paper's clip: 0.996 and 1.487 before a trace (mean 1.242) vs 0.850 and 0.949 before a bare answer (mean
    # 0.900), ratio 1.380; the wide clip: bare 0.135 and 0.949 (mean 0.542), ratio 2.29
    assert token["first_token_ratio"]["ratio"] == pytest.approx(1.380 if lower_clip == -0.08 else 2.291, abs=1e-3)


def test_first_token_ratio_names_the_source_it_favours():
    """The sequence level gives every token of a row the row's weight exp(sum_j clip(raw_j)), the first too; here
    the bare answers come out ahead, so they are the ratio's numerator."""
    rows = [("trace", [0.0, -0.5, -0.5]), ("bare", [0.0, 0.2])]
    sequence = two_style_rows(rows, PearSft())["levels"]["sequence"]
    trace, bare = math.exp(-0.16), math.exp(0.2)
    assert sequence["by_source"]["trace"]["first_token_weight"] == pytest.approx(trace, rel=1e-5)
    assert sequence["first_token_ratio"] == {"numerator": "bare", "denominator": "trace",
                                             "ratio": pytest.approx(bare / trace, rel=1e-5)}


DEFAULT_PEAR = PearSft()


def uniform_rows(rows, default=DEFAULT_PEAR):
    """A table whose rows (source, T, raw) share one log-ratio per row, and its figures under `default`."""
    table = pa.table({
        "prompt_ids": [[1]] * len(rows),
        "response_ids": [[5] * length for _, length, _ in rows],
        "behavior_logprobs": [[-2.0] * length for _, length, _ in rows],
        "source": [source for source, _, _ in rows],
    })
    return weight_figures(table, [[-2.0 + raw] * length for _, length, raw in rows], default)


def test_verdict_close():
    figures = uniform_rows([("trace", 30, 0.0), ("bare", 30, 0.001)], PearSft(gamma=1.0))
    [line, sources, first] = verdict(figures, "token")
    assert line.startswith("token level: ESS 1.00 of tokens, 0% at the floor: the data sits close to the student")
    assert "almost like canonical SFT" in line
    assert sources.endswith("PEAR will weight the sources alike")
    bare = math.exp(29 * 0.001)  # the 29 later tokens' log-ratios; the trace's are 0
    assert first == (f"token level: the first response token gets weight {bare:.3g} in 'bare' rows vs 1 in 'trace' "
                     f"rows ({bare:.3g}x): PEAR will weight how responses start alike")


def test_verdict_far_and_a_favoured_source():
    # bare: d = -0.08 per token and gamma 0.999, so log G_t = (200 - t)(-0.08 + log 0.999) <= -10 for t <= 76
    figures = uniform_rows([("bare", 200, -1.0), ("trace", 200, 0.0)])
    [line, sources, first] = verdict(figures, "token")
    assert line.startswith("token level: ESS ")
    assert "19% at the floor: the data sits some way from the student" in line  # 76 of 400 tokens
    trace, bare = 0.999 ** 199, math.exp(-10.0)  # bare: 199 (-0.08 + log 0.999) = -16.1, clipped to -10
    assert first == (f"token level: the first response token gets weight {trace:.3g} in 'trace' rows vs "
                     f"{bare:.3g} in 'bare' rows ({trace / bare:.3g}x): PEAR will steer how responses start toward "
                     "'trace'")
    figures = uniform_rows([("bare", 200, -1.0)])
    [line] = verdict(figures, "token")
    assert "38% at the floor: the teacher is far from this student" in line
    assert "PEAR will train mostly on the ends of responses" in line
    figures = uniform_rows([("bare", 200, -1.0), ("trace", 200, 0.0), ("trace", 10, 0.0)])
    [line, sources, _] = verdict(figures, "sequence")
    assert "49% at the floor: the teacher is far" in line and "whole responses" in line  # 200 of 410 tokens
    bare, trace = math.exp(-10.0), 1.0
    assert sources == (f"sequence level: source 'bare' gets mean weight {bare:.2f} vs 'trace' {trace:.2f}: "
                       "PEAR will shift the student toward 'trace'")


@pytest.mark.parametrize("job_file,overrides,notes", [
    ("jobs/distill.yaml", ["score.keep=correct"], 1),  # a behaviour model writes the data, keeps the correct rows
    ("jobs/distill.yaml", [], 0),
    ("jobs/distill.yaml", ["score.keep=correct", "data.sft=teacher.jsonl"], 0),  # given data: nothing filtered
    ("jobs/pear-vs-sft.yaml", ["score.keep=correct"], 0),  # the scripted policy keeps every row, log-probs exact
])
def test_a_note_when_the_behaviour_model_filtered_its_data(job_file, overrides, notes):
    lines = fidelity_notes(load_job(job_file, overrides))
    assert len(lines) == notes
    assert all("unconditional" in line and "log P(correct | prompt)" in line for line in lines)


def test_inspect_command_end_to_end(tmp_path, tiny_model_dir, ray_cluster):
    rng = np.random.default_rng(0)
    lengths = [2, 5, 9, 14, 20, 33, 3, 40]
    rows = [{"prompt_ids": rng.integers(3, 384, 4).tolist(), "response_ids": rng.integers(3, 384, n).tolist(),
             "behavior_logprobs": rng.uniform(-8.0, -4.0, n).tolist(), "source": ["trace", "bare"][i % 2]}
            for i, n in enumerate(lengths)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({
        "name": "inspect", "output_dir": str(tmp_path / "runs"), "loggers": [],
        "models": {"student": {"path": str(tiny_model_dir)}}, "data": {"sft": str(data)},
        "sft": {"pear": {"level": "token", "gamma": 0.95}},
    }))
    result = CliRunner().invoke(app, ["inspect", str(job_file), "sft.pear.block_size=3"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "inspect"
    assert json.loads((run_dir / "state.json").read_text())["done"] == {"score": "data/sft.parquet"}  # folder-relative
    saved = json.loads((run_dir / "inspect.json").read_text())
    assert f"figures: {run_dir / 'inspect.json'}" in result.stdout
    assert f"plot: {run_dir / 'plots' / 'inspect.png'}" in result.stdout
    assert (run_dir / "plots" / "inspect.png").stat().st_size > 10_000
    assert saved["settings"] == {"gamma": 0.95, "block_size": 3, "delta_clip": [-0.08, 0.3],
                                 "log_weight_clip": [-10.0, 5.0]}
    assert saved["verdict"] == verdict(saved, "token") and saved["verdict"][0] in result.stdout
    first = saved["levels"]["token"]["first_token_ratio"]
    assert f"token level: first-token weight ratio {first['numerator']}/{first['denominator']}" in result.stdout
    assert saved["verdict"][2] in result.stdout and "first response token" in saved["verdict"][2]

    table = pq.read_table(run_dir / "data" / "sft.parquet")
    assert table.column("source").to_pylist() == [row["source"] for row in rows]
    settings = PearSft(gamma=0.95, block_size=3)
    expected = weight_figures(table, HfScorer(tiny_model_dir).logprobs(table), settings)
    assert saved["levels"] == json.loads(json.dumps(expected["levels"]))
    assert (saved["rows"], saved["tokens"]) == (8, sum(lengths))
    assert list(saved["levels"]["token"]["by_source"]) == ["bare", "trace"]
