"""The pre-registered primary comparison: style shares aggregated as metrics, each threshold read from the summary,
the verdict by the thresholds, the primary line first in summary.json and the report, and its config refused when it
names what the job does not measure. Figures are worked out by hand on test_aggregate's fixed table."""

import json
from pathlib import Path

import pyarrow as pa
import pytest

from pear_ray.config import load_job
from pear_ray.config.primary import PrimaryComparison
from pear_ray.tracking import aggregate, write_experiment_report, write_summary
from pear_ray.tracking.preregistration import FALSIFIED, INCONCLUSIVE, SUPPORTED, judge
from tests.unit.test_aggregate import N_BOOT, SCHEMA, N, rows

JOBS = Path(__file__).resolve().parents[2] / "jobs"

# Samples in the trace style per prompt: token writes every sample as a trace after SFT, none one per prompt.
TRACES = {("none", "sft"): 1, ("token", "sft"): N, ("none", "rl"): 2, ("token", "rl"): 3}


def styled_table(seeds=(0, 1, 2)):
    with_styles = [{**row, "style_trace": TRACES[row["variant"], row["stage"]]} for row in rows()
                   if row["seed"] in seeds]
    return pa.Table.from_pylist(with_styles, schema=SCHEMA.append(pa.field("style_trace", pa.int32())))


def primary(**fields) -> PrimaryComparison:
    return PrimaryComparison(**{"variant": "token", "prediction": "token beats none after RL", **fields})


def test_a_style_count_column_becomes_a_share_metric_with_paired_differences():
    summary = aggregate(styled_table(), [1], n_boot=N_BOOT)
    assert summary.metrics == ("pass@1", "share_trace")
    assert summary.scores["token", "sft", "share_trace"].mean == pytest.approx(1.0)
    assert summary.scores["none", "sft", "share_trace"].mean == pytest.approx(1 / N)
    difference = summary.comparisons["token", "rl", "share_trace"]
    assert difference.mean_diff == pytest.approx(1 / N) and difference.seeds_positive == 3
    assert difference.ci95 == pytest.approx((1 / N, 1 / N))  # the same difference on every prompt


def test_the_verdict_follows_the_thresholds():
    summary = aggregate(styled_table(), [1], n_boot=N_BOOT)  # token - none, pass@1 after RL: +1/48, 1/3 seeds
    supported = judge(primary(supported_if=[{"statistic": "mean_diff", "at_least": 0.02},
                                            {"statistic": "seeds_positive", "at_least": 1}]), summary)
    assert supported.verdict == SUPPORTED
    assert [check.value for check in supported.supported] == pytest.approx([1 / 48, 1])
    falsified = judge(primary(supported_if=[{"statistic": "mean_diff", "at_least": 0.05}],
                              falsified_if=[{"statistic": "mean_diff", "below": 0.05},
                                            {"statistic": "mean_diff", "stage": "sft", "metric": "share_trace",
                                             "at_least": 0.5}]), summary)
    assert falsified.verdict == FALSIFIED
    assert falsified.falsified[1].value == pytest.approx(1 - 1 / N)
    neither = judge(primary(supported_if=[{"statistic": "mean_diff", "at_least": 0.05}],
                            falsified_if=[{"statistic": "mean_diff", "below": 0.0}]), summary)
    assert neither.verdict == INCONCLUSIVE
    overlapping = judge(primary(supported_if=[{"statistic": "mean_diff", "above": 0}],
                                falsified_if=[{"statistic": "mean_diff", "below": 0.05}]), summary)
    assert overlapping.verdict == INCONCLUSIVE


def test_every_statistic_is_read_from_the_summary():
    summary = aggregate(styled_table(), [1], n_boot=N_BOOT)
    comparison = summary.comparisons["token", "rl", "pass@1"]
    thresholds = [{"statistic": s, "at_least": -1} for s in ("mean_diff", "seeds_positive", "seed_ci_low",
                                                                "seed_ci_high", "prompt_ci_low", "prompt_ci_high")]
    result = judge(primary(supported_if=[*thresholds, {"statistic": "mean", "variant": "none", "stage": "sft",
                                                       "metric": "share_trace", "at_most": 0.45}]), summary)
    assert [check.value for check in result.supported] == pytest.approx([
        comparison.mean_diff, comparison.seeds_positive, *comparison.seed_ci95, *comparison.ci95, 1 / N])
    assert result.verdict == SUPPORTED


def test_an_interval_over_one_seed_does_not_exist_so_its_threshold_fails():
    summary = aggregate(styled_table(seeds=(2,)), [1], n_boot=N_BOOT)
    result = judge(primary(supported_if=[{"statistic": "seed_ci_low", "above": -1}]), summary)
    assert result.supported[0].value is None and not result.supported[0].holds
    assert result.verdict == INCONCLUSIVE


def test_the_primary_line_comes_first_in_summary_json_and_the_report(tmp_path):
    summary = aggregate(styled_table(), [1], n_boot=N_BOOT)
    result = judge(primary(supported_if=[{"statistic": "mean_diff", "at_least": 0.05}],
                           secondary=[{"says": "token writes traces after SFT",
                                       "holds_if": [{"statistic": "mean", "stage": "sft", "metric": "share_trace",
                                                     "at_least": 0.7}]}]), summary)
    document = json.loads(write_summary(tmp_path, summary, result.as_json()).read_text())
    assert list(document)[0] == "primary"
    assert document["primary"]["verdict"] == INCONCLUSIVE
    assert document["primary"]["comparison"]["mean_diff"] == pytest.approx(1 / 48)
    assert document["primary"]["secondary"][0]["holds"] is True
    report = write_experiment_report(tmp_path, summary, job_name="tiny", seeds=[0, 1, 2], cells=[""], extra={},
                                     wall_seconds=None, primary=result).read_text()
    line = ("**token-level PEAR vs canonical SFT, pass@1 after RL: +0.021 ± 0.021 (mean paired difference ± SE over "
            "3 seeds), 1/3 seeds positive")
    assert line in report and report.index(line) < report.index("## Every metric per label")
    assert "Secondary prediction 1, held: token writes traces after SFT" in report
    assert "| mean_diff of pass@1 (token) after RL | >= 0.05 | +0.021 | no |" in report


@pytest.mark.parametrize("override, message", [
    ("primary={variant: tok, prediction: p, supported_if: [{statistic: mean_diff, at_least: 0}]}",
     "primary: variant 'tok' is not in sft.variants"),
    ("primary={variant: token, metric: pass@4, prediction: p, supported_if: [{statistic: mean_diff, at_least: 0}]}",
     "primary: pass@4 is not reported; eval.k is [1, 8]"),
    ("primary={variant: token, prediction: p, supported_if: [{statistic: mean, variant: wide, at_least: 0}]}",
     "primary threshold on mean: variant 'wide' is not in sft.variants"),
    ("primary={variant: token, prediction: p, supported_if: [{statistic: mean_diff}]}",
     "a threshold on mean_diff needs a bound"),
    ("primary={variant: token, metric: accuracy, prediction: p, supported_if: [{statistic: mean, at_least: 0}]}",
     "primary.metric"),
])
def test_a_primary_comparison_the_job_cannot_measure_is_refused(override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_job(JOBS / "pear-vs-sft.yaml", [override])


def test_a_grid_has_no_one_primary_variant():
    with pytest.raises(ValueError, match="primary: a grid gives every variant one label per cell"):
        load_job(JOBS / "pear-vs-sft.yaml", ["grid={sft.epochs: [1, 2]}", "primary={variant: token, prediction: p, "
                                             "supported_if: [{statistic: mean_diff, at_least: 0}]}"])
