"""Experiment aggregation over seeds: scores, paired differences, the bootstrap interval, summary.json, conclusions,
refusals, and the experiment report, checked against values worked out by hand on a tiny fixed table."""

import json
import math
import statistics

import numpy as np
import pyarrow as pa
import pytest

from pear_ray.tracking import aggregate, write_experiment_report, write_summary
from pear_ray.tracking.aggregate import Comparison, paired_bootstrap_ci, t_quantile_975
from pear_ray.tracking.experiment_report import spearman

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCHEMA = pa.schema([("seed", pa.int64()), ("cell", pa.string()), ("variant", pa.string()), ("stage", pa.string()),
                    ("prompt_id", pa.string()), ("n", pa.int64()), ("correct", pa.int64())])
N = 4
# Correct samples of n = 4 per (variant, stage), one row per seed 0..2, prompts p0..p3.
COUNTS = {
    ("none", "sft"): [[1, 2, 0, 4], [2, 2, 1, 3], [0, 1, 1, 2]],
    ("token", "sft"): [[2, 2, 1, 4], [3, 2, 1, 4], [1, 1, 2, 3]],
    ("none", "rl"): [[2, 2, 1, 4], [2, 3, 1, 3], [1, 1, 2, 2]],
    ("token", "rl"): [[3, 1, 1, 4], [2, 3, 2, 2], [2, 1, 2, 2]],
}
N_BOOT = 200


def rows(counts=COUNTS, cell=""):
    return [{"seed": seed, "cell": cell, "variant": variant, "stage": stage, "prompt_id": f"p{p}", "n": N,
             "correct": c}
            for (variant, stage), per_seed in counts.items() for seed, cs in enumerate(per_seed)
            for p, c in enumerate(cs)]


def table(rows_):
    return pa.Table.from_pylist(rows_, schema=SCHEMA)


def reference_ci(diffs, n_boot, seed):
    """Straightforward paired bootstrap: same resampled prompts for every seed, mean over all entries, linear
    percentile interpolation on the sorted means."""
    diffs = np.asarray(diffs)
    seeds, prompts = diffs.shape
    draws = np.random.default_rng(seed).integers(0, prompts, size=(n_boot, prompts))
    means = sorted(sum(diffs[s][p] for s in range(seeds) for p in draw) / (seeds * prompts) for draw in draws)

    def percentile(q):
        pos = q / 100 * (n_boot - 1)
        i = math.floor(pos)
        return means[i] + (means[min(i + 1, n_boot - 1)] - means[i]) * (pos - i)

    return percentile(2.5), percentile(97.5)


def pass1_diffs(stage):
    return [[(t - b) / N for t, b in zip(token, base)]
            for token, base in zip(COUNTS["token", stage], COUNTS["none", stage])]


def fmt(x):
    return f"{x:+.3f}".replace("-", "\u2212")


@pytest.fixture(scope="module")
def summary():
    return aggregate(table(rows()), [1, 2], n_boot=N_BOOT, boot_seed=7, mean_weights={("", "token"): 0.62,
                                                                                      ("", "none"): 1.0})


def test_scores_are_mean_and_se_over_seeds_of_prompt_means(summary):
    score = summary.scores["none", "sft", "pass@1"]
    assert score.per_seed == {0: 7 / 16, 1: 8 / 16, 2: 4 / 16}
    assert score.mean == pytest.approx(19 / 48)
    assert score.se == pytest.approx(statistics.stdev([7 / 16, 8 / 16, 4 / 16]) / math.sqrt(3))
    # pass@2 from n = 4: c = 0, 1, 2, 3, 4 -> 0, 1/2, 5/6, 1, 1
    assert summary.scores["none", "sft", "pass@2"].per_seed == pytest.approx({0: 7 / 12, 1: 19 / 24, 2: 11 / 24})
    assert summary.scores["none", "sft", "pass@2"].mean == pytest.approx(11 / 18)
    assert summary.labels == ("none", "token") and summary.seeds == (0, 1, 2) and summary.num_prompts == (4,)


def test_paired_differences(summary):
    sft, rl = summary.comparisons["token", "sft", "pass@1"], summary.comparisons["token", "rl", "pass@1"]
    # d_s after SFT: 2/16, 2/16, 3/16; after RL: 0, 0, 1/16
    assert sft.mean_diff == pytest.approx(7 / 48) and sft.se_diff == pytest.approx(1 / 48)
    assert (sft.seeds_positive, sft.n_seeds) == (3, 3)
    assert rl.mean_diff == pytest.approx(1 / 48) and rl.se_diff == pytest.approx(1 / 48)
    assert (rl.seeds_positive, rl.seeds_negative, rl.n_seeds) == (1, 0, 3)
    assert ("none", "sft", 1) not in summary.comparisons


def test_bootstrap_interval_matches_a_straightforward_implementation(summary):
    for stage in ("sft", "rl"):
        assert summary.comparisons["token", stage, "pass@1"].ci95 == pytest.approx(reference_ci(pass1_diffs(stage),
                                                                                         N_BOOT, 7))
    assert summary.comparisons["token", "sft", "pass@1"].ci95[0] > 0  # every prompt's mean difference is >= 0
    rl = summary.comparisons["token", "rl", "pass@1"].ci95
    assert rl[0] < 0 < rl[1]


def test_bootstrap_interval_of_a_constant_difference_is_that_constant():
    assert paired_bootstrap_ci(np.full((3, 4), 0.25), 50, 0) == (0.25, 0.25)
    base = [[0, 1, 2, 3], [1, 1, 2, 0], [3, 2, 1, 0]]
    shifted = {key: [[c + (key[0] == "token") for c in cs] for cs in base] for key in COUNTS}  # token: one more
    comparison = aggregate(table(rows(shifted)), [1], n_boot=50).comparisons["token", "sft", "pass@1"]
    assert comparison.ci95 == (0.25, 0.25) and comparison.mean_diff == 0.25 and comparison.se_diff == 0.0
    assert comparison.conclusion == ("token-level PEAR beats canonical SFT after SFT in 3/3 seeds, "
                                     "+0.250 ± 0.000 pass@1 (95% CI [+0.250, +0.250] over prompts, "
                                     "[+0.250, +0.250] over seeds)")


def test_conclusions_follow_from_the_numbers(summary):
    lo, hi = summary.comparisons["token", "sft", "pass@1"].ci95
    half = 4.303 * (1 / 48)  # t(2) x the SE of the per-seed differences
    assert summary.comparisons["token", "sft", "pass@1"].conclusion == (
        f"token-level PEAR beats canonical SFT after SFT in 3/3 seeds, +0.146 ± 0.021 pass@1 "
        f"(95% CI [{fmt(lo)}, {fmt(hi)}] over prompts, [{fmt(7 / 48 - half)}, {fmt(7 / 48 + half)}] over seeds)")
    lo, hi = summary.comparisons["token", "rl", "pass@1"].ci95
    slo, shi = summary.comparisons["token", "rl", "pass@1"].seed_ci95
    assert summary.comparisons["token", "rl", "pass@1"].conclusion == (
        f"token-level PEAR vs canonical SFT after RL: no difference resolved (+0.021 ± 0.021 pass@1, "
        f"95% CI [{fmt(lo)}, {fmt(hi)}] over prompts, [{fmt(slo)}, {fmt(shi)}] over seeds, 1/3 seeds positive)")
    flipped = aggregate(table(rows()), [1], baseline="token", n_boot=N_BOOT, boot_seed=7)
    comparison = flipped.comparisons["none", "sft", "pass@1"]
    assert (comparison.seeds_positive, comparison.seeds_negative) == (0, 3)
    assert comparison.conclusion.startswith("canonical SFT trails token-level PEAR after SFT in 3/3 seeds, "
                                            "\u22120.146 ± 0.021 pass@1")


def test_summary_json_structure_and_values(tmp_path, summary):
    path = write_summary(tmp_path, summary)
    document = json.loads(path.read_text())
    assert list(document) == ["primary", "baseline", "comparisons"] and document["primary"] is None
    data = document["comparisons"]
    assert list(data) == ["token"]
    assert {stage: list(by_k) for stage, by_k in data["token"].items()} == {"sft": ["pass@1", "pass@2"],
                                                                           "rl": ["pass@1", "pass@2"]}
    entry = data["token"]["sft"]["pass@1"]
    assert set(entry) == {"mean_diff", "se_diff", "seeds_positive", "n_seeds", "ci95", "seed_ci95", "resolved"}
    assert entry["mean_diff"] == pytest.approx(7 / 48) and entry["se_diff"] == pytest.approx(1 / 48)
    assert (entry["seeds_positive"], entry["n_seeds"]) == (3, 3)
    assert entry["ci95"] == list(summary.comparisons["token", "sft", "pass@1"].ci95)


def test_summary_json_writes_null_for_the_se_of_one_seed(tmp_path):
    one_seed = table([row for row in rows() if row["seed"] == 0])
    summary = aggregate(one_seed, [1], n_boot=N_BOOT)
    assert summary.scores["none", "sft", "pass@1"].se is None
    text = write_summary(tmp_path, summary).read_text()
    assert "NaN" not in text
    entry = json.loads(text)["comparisons"]["token"]["sft"]["pass@1"]
    assert entry["se_diff"] is None and entry["mean_diff"] == pytest.approx(2 / 16) and entry["n_seeds"] == 1


def drop(predicate):
    return [row for row in rows() if not predicate(row)]


def with_change(predicate, **change):
    return [{**row, **change} if predicate(row) else row for row in rows()]


@pytest.mark.parametrize("rows_, ks, message", [
    (drop(lambda r: r["variant"] == "token" and r["stage"] == "rl" and r["seed"] == 2), [1],
     "'token' has no rl results for seed(s) [2] that its baseline 'none' has"),
    (rows() + [{**r, "seed": 3} for r in rows() if r["variant"] == "token" and r["seed"] == 0], [1],
     "'token' has sft results for seed(s) [3] that its baseline 'none' lacks"),
    (with_change(lambda r: (r["variant"], r["stage"], r["seed"], r["prompt_id"]) == ("token", "sft", 1, "p3"),
                 prompt_id="p9"), [1],
     "'token' and its baseline 'none' were evaluated on different prompts after sft in seed 1 (2 prompt(s) not "
     "in both, e.g. 'p3')"),
    (with_change(lambda r: r["stage"] == "rl" and r["seed"] == 2 and r["prompt_id"] == "p0", prompt_id="q0"), [1],
     "baseline 'none' was evaluated on different prompts after rl in seed 2 than in seed 0"),
    (rows(), [1, 8], "pass@8 needs n >= 8 samples per prompt, but 'none' after sft, seed 0, prompt 'p0' has n = 4"),
    (drop(lambda r: r["variant"] == "none"), [1], "'token' has no baseline: there are no 'none' results"),
    (rows() + rows()[:1], [1], "'none', stage 'sft', seed 0, prompt 'p0': the prompt appears twice"),
    (with_change(lambda r: r["prompt_id"] == "p0", correct=5), [1], "correct=5 out of n=4 samples is impossible"),
    (with_change(lambda r: r["stage"] == "rl", stage="grpo"), [1], "unknown stage"),
])
def test_refuses_inconsistent_input(rows_, ks, message):
    with pytest.raises(ValueError) as error:
        aggregate(table(rows_), ks, n_boot=N_BOOT)
    assert message in str(error.value)


def test_refuses_bad_tables_and_arguments():
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['cell'\]"):
        aggregate(table(rows()).drop_columns(["cell"]), [1])
    with pytest.raises(ValueError, match="empty"):
        aggregate(table([]), [1])
    with pytest.raises(ValueError, match="mean_weights has .*'block'"):
        aggregate(table(rows()), [1], mean_weights={("", "block"): 0.5})
    with pytest.raises(ValueError, match="ks must be positive"):
        aggregate(table(rows()), [0])


def test_spearman():
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))  # ties share the average rank
    assert spearman([1, 1], [1, 2]) is None


def test_report_without_grid(tmp_path, summary):
    path = write_experiment_report(tmp_path, summary, job_name="tiny", seeds=[0, 1, 2, 3], cells=[""],
                                   extra={"task": "countdown"}, wall_seconds=3725)
    text = path.read_text()
    assert "- seeds: 0, 1, 2, 3 (results for 0, 1, 2)" in text and "- wall time: 1 h 2 min" in text
    assert "| token | 0.620 | 0.542 ± 0.055 |" in text  # token after SFT: 26/48 over seeds 9/16, 10/16, 7/16
    assert "| token | after SFT | pass@1 | +0.146 ± 0.021 | 3/3 |" in text
    for comparison in summary.comparisons.values():
        assert f"- {comparison.conclusion}." in text
    assert "N = 4 eval prompts, reported as mean ± SE over 3 seeds (0, 1, 2)" in text
    assert "Reversal check" not in text
    for name in ("experiment_pass_at_k.png", "paired_differences.png"):
        assert (tmp_path / "plots" / name).read_bytes().startswith(PNG_MAGIC)
        assert f"(plots/{name})" in text


def test_report_with_grid_ranks_every_checkpoint(tmp_path):
    # Cell sft.epochs=3 swaps the stages of cell sft.epochs=1, so the best checkpoint after SFT is not the best
    # after RL: pass@1 after SFT 19/48, 26/48 | 24/48, 25/48; after RL 24/48, 25/48 | 19/48, 26/48.
    swapped = {(variant, {"sft": "rl", "rl": "sft"}[stage]): cs for (variant, stage), cs in COUNTS.items()}
    grid = table(rows(cell="sft.epochs=1") + rows(swapped, cell="sft.epochs=3"))
    summary = aggregate(grid, [1], n_boot=N_BOOT)
    assert summary.labels == ("none | sft.epochs=1", "token | sft.epochs=1", "none | sft.epochs=3",
                              "token | sft.epochs=3")
    assert summary.comparisons["token | sft.epochs=3", "rl", "pass@1"].mean_diff == pytest.approx(7 / 48)
    summary_json = json.loads(write_summary(tmp_path, summary).read_text())
    assert list(summary_json["comparisons"]) == ["token | sft.epochs=1", "token | sft.epochs=3"]
    text = write_experiment_report(tmp_path, summary, job_name="grid", seeds=[0, 1, 2],
                                   cells=["sft.epochs=1", "sft.epochs=3"], extra={}, wall_seconds=None).read_text()
    assert "| 1 | token \\| sft.epochs=1 (0.542) | token \\| sft.epochs=3 (0.542) |" in text
    assert "| 4 | none \\| sft.epochs=1 (0.396) | none \\| sft.epochs=3 (0.396) |" in text
    # ranks after SFT 1, 4, 2, 3 and after RL 2, 3, 1, 4: rho = 1 - 6 * 4 / (4 * 15) = 0.6
    assert ("The SFT and RL rankings disagree on the top label (best after SFT: `token | sft.epochs=1`, best after "
            "RL: `token | sft.epochs=3`); Spearman rank correlation between the two rankings: ρ = +0.600 over 4 "
            "labels.") in text
    assert "token-level PEAR beats canonical SFT at sft.epochs=3 after RL in 3/3 seeds" in text
    assert (tmp_path / "plots" / "paired_differences.png").read_bytes().startswith(PNG_MAGIC)


def test_a_difference_the_seeds_do_not_agree_on_is_not_resolved_however_narrow_the_prompt_interval():
    """Per-seed differences +0.30, +0.05, +0.05 on every prompt: resampling prompts gives an interval far from 0,
    but with 3 seeds the t interval, mean ± 4.303 SE, reaches below 0."""
    diffs = {0: 0.30, 1: 0.05, 2: 0.05}
    comparison = Comparison(label="token", variant="token", baseline="none", cell="", stage="sft", metric="pass@1",
                            mean_diff=float(np.mean(list(diffs.values()))),
                            se_diff=float(np.std(list(diffs.values()), ddof=1) / np.sqrt(3)), seeds_positive=3,
                            seeds_negative=0, n_seeds=3, ci95=(0.12, 0.14))
    lo, hi = comparison.seed_ci95
    assert lo < 0 < hi and hi == pytest.approx(comparison.mean_diff + 4.303 * comparison.se_diff)
    assert not comparison.resolved and "no difference resolved" in comparison.conclusion
    assert t_quantile_975(2) == 4.303 and t_quantile_975(12) == 2.228 and t_quantile_975(500) == 1.980
