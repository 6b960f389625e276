"""Experiments: one job over seeds and a grid, one run folder per cell, one aggregated report and summary.json."""

import json

import pyarrow.parquet as pq
import pytest
from support.cli import TINY_EXPERIMENT, finish, pear_ray

from pear_ray.config import ConfigError, load_job
from pear_ray.driver.experiment import cells, prior_key
from pear_ray.stages.prior import prior_seed


def test_cells_cross_the_grid_with_the_seeds_and_refuse_a_bad_value_up_front():
    job = load_job("jobs/pear-vs-sft.yaml", ["seeds=[3,4]", "grid={sft.epochs: [1, 12], rl.optimizer.lr: [0.001]}"])
    planned = cells(job)
    assert [folder for _, folder, _ in planned] == [
        "sft.epochs=1,rl.optimizer.lr=0.001/seed3", "sft.epochs=1,rl.optimizer.lr=0.001/seed4",
        "sft.epochs=12,rl.optimizer.lr=0.001/seed3", "sft.epochs=12,rl.optimizer.lr=0.001/seed4"]
    assert [(c.seed, c.sft.epochs, c.rl.optimizer.lr, c.seeds, c.grid) for _, _, c in planned][1] == (4, 1, 0.001, [], {})
    with pytest.raises(ConfigError, match="(?s)cell sft.epochs=0/seed3.*sft.epochs"):
        cells(load_job("jobs/pear-vs-sft.yaml", ["seeds=[3]", "grid={sft.epochs: [2, 0]}"]))


def test_a_prior_seed_gives_every_seed_and_cell_one_prior():
    """Without models.student.prior.seed each seed trains its own prior (shared by the grid cells of that seed); with
    it, every cell starts from the prior that seed would train."""
    grid = ["seeds=[0,1]", "grid={sft.epochs: [1, 3]}"]
    own = [job for _, _, job in cells(load_job("jobs/pear-vs-sft.yaml", grid))]
    assert [prior_seed(job) for job in own] == [0, 1, 0, 1]
    assert len({prior_key(job) for job in own}) == 2 and prior_key(own[0]) == prior_key(own[2])
    shared = [job for _, _, job in cells(load_job("jobs/pear-vs-sft.yaml", [*grid, "models.student.prior.seed=1"]))]
    assert [prior_seed(job) for job in shared] == [1, 1, 1, 1]
    assert len({prior_key(job) for job in shared}) == 1 and prior_key(shared[0]).startswith("seed1-")


@pytest.mark.slow  # about 1.5 minutes: six short runs; the aggregation math is tested on its own in test_aggregate
def test_an_experiment_runs_each_seed_on_the_same_eval_prompts_and_aggregates_them(tmp_path):
    job_dir = tmp_path / "experiment"
    output = finish(pear_ray("run", "jobs/pear-vs-sft.yaml", *TINY_EXPERIMENT, "--run-dir", str(job_dir)))
    assert str(job_dir / "report.md") in output
    per_seed = [pq.read_table(job_dir / f"seed{seed}" / "eval" / "sft-none.parquet").to_pydict() for seed in (0, 1)]
    assert per_seed[0]["prompt_id"] == per_seed[1]["prompt_id"] and len(per_seed[0]["prompt_id"]) == 6
    assert [table["seed"][0] for table in per_seed] == [0, 1]
    data = [pq.read_table(job_dir / f"seed{seed}" / "data" / "sft.parquet") for seed in (0, 1)]
    assert data[0].column("prompt").equals(data[1].column("prompt"))  # same train prompts too
    assert data[0].column("source").to_pylist() != data[1].column("source").to_pylist()  # sampled per seed
    document = json.loads((job_dir / "summary.json").read_text())
    assert document["primary"] is None and document["baseline"] == "none"
    summary = document["comparisons"]
    assert set(summary) == {"token"} and set(summary["token"]) == {"sft"}
    for figures in summary["token"]["sft"].values():
        assert figures["n_seeds"] == 2 and 0 <= figures["seeds_positive"] <= 2
        assert figures["ci95"][0] <= figures["mean_diff"] <= figures["ci95"][1]
    report = (job_dir / "report.md").read_text()
    assert "token" in report and "canonical" in report
    [seconds] = json.loads((job_dir / "wall_seconds.json").read_text())
    assert seconds > 0 and "wall time:" in report


@pytest.mark.slow  # two tiny experiments, about 2 minutes
def test_cells_side_by_side_as_ray_tasks_give_the_sequential_results(tmp_path):
    """Two cells at once, each driven by a Ray task; on CPU every run is deterministic, so each prompt's correct
    count equals the sequential run's (test above, same settings)."""
    sequential, parallel = tmp_path / "sequential", tmp_path / "parallel"
    overrides = [*TINY_EXPERIMENT, "sft.variants=[none]"]
    finish(pear_ray("run", "jobs/pear-vs-sft.yaml", *overrides, "--run-dir", str(sequential)))
    output = finish(pear_ray("run", "jobs/pear-vs-sft.yaml", *overrides, "parallel_cells=2", "--run-dir",
                             str(parallel)))
    assert output.count("experiment: starting cell") == 2 and "(2 running)" in output
    for seed in (0, 1):
        a, b = (pq.read_table(d / f"seed{seed}" / "eval" / "sft-none.parquet") for d in (sequential, parallel))
        assert a.equals(b)
    assert (parallel / "report.md").is_file()


@pytest.mark.parametrize("override,message", [
    ("task.kind=reasoning_gym", "needs task.kind: addition"),
    ("models.student={scripted: {p_trace: 1.0}}", "only models.behavior can be scripted"),
    ("models.behavior={scripted: {p_trace: 0.5}, tiny: {seed: 2}}", "exactly one of"),
    ("models.student.prior.steps=0", "models.student.prior.steps"),
    ("data.sft=teacher.jsonl", "cannot score data.sft"),
])
def test_scripted_policies_and_priors_are_checked_before_anything_starts(override, message):
    with pytest.raises(ConfigError, match=message):
        load_job("jobs/pear-vs-sft.yaml", [override])
