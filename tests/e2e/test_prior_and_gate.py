"""An experiment's shared student prior (models.student.prior.seed), trained once and reused by every cell, and the
gate before SFT (job key `gate`), which stops an experiment or a run whose PEAR variant weights the two styles' first
response token alike."""

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from support.cli import TINY_EXPERIMENT, finish, pear_ray, steps, stop_group

from pear_ray.engines.hf_scorer import HfScorer

TRANSFORMERS_ENGINE = "resources.rollout.engine={backend: transformers}"  # no vLLM start for six eval prompts
SHARED_PRIOR = [*TINY_EXPERIMENT, "models.student.prior.seed=0", TRANSFORMERS_ENGINE]
TINY_STUDENT = [override for override in TINY_EXPERIMENT if override.startswith("models.student.tiny.")]


def prior_of_every_cell(job_dir: Path) -> Path:
    """The one prior folder under priors/, after checking that every cell's state.json records it as its prior."""
    [prior] = (job_dir / "priors").iterdir()
    for seed in (0, 1):
        assert json.loads((job_dir / f"seed{seed}" / "state.json").read_text())["done"]["prior"] == \
            f"../priors/{prior.name}"
    return prior


def failed(*args: str) -> str:
    """Run `pear-ray` expecting exit status 1; its one error line."""
    process = pear_ray(*args)
    try:
        output, _ = process.communicate(timeout=600)
    finally:
        stop_group(process)
    assert process.returncode == 1, output[-5000:]
    [error] = [line for line in output.splitlines() if line.startswith("error:")]
    return error


def token_level_first_token_ratio(student: Path, data: Path) -> float:
    """By hand, the paper's defaults (gamma 0.999, delta clip [-0.08, 0.3], log-weight clip [-10, 5]): a row's first
    token weight is exp((T - 1) log gamma + sum_{j > 1} clip(lt_j - lb_j)); the mean over trace rows over the mean
    over bare rows."""
    table = pq.read_table(data)
    student_logprobs = HfScorer(student).logprobs(table).to_pylist()
    first = {"trace": [], "bare": []}
    for source, behavior, target in zip(table.column("source").to_pylist(),
                                        table.column("behavior_logprobs").to_pylist(), student_logprobs):
        d = np.clip(np.subtract(target, behavior), -0.08, 0.3)
        log_g1 = (len(d) - 1) * math.log(0.999) + d[1:].sum()
        first[source].append(math.exp(min(max(log_g1, -10.0), 5.0)))
    return np.mean(first["trace"]) / np.mean(first["bare"])


def test_a_failing_gate_stops_an_experiment_before_sft_and_its_cells_share_one_prior(tmp_path):
    job_dir = tmp_path / "experiment"
    error = failed("run", "jobs/pear-vs-sft.yaml", *SHARED_PRIOR, "gate={variant: token, min_ratio: 1000}",
                   "--run-dir", str(job_dir))
    assert not list(job_dir.glob("seed*/models/sft-*")) and not list(job_dir.glob("seed*/checkpoints/sft-*"))
    prior = prior_of_every_cell(job_dir)
    assert [len(steps(job_dir / f"seed{seed}", "prior_sft")) for seed in (0, 1)] == [4, 0]  # trained once
    readings = json.loads((job_dir / "gate.json").read_text())["readings"]
    assert list(readings) == ["seed0", "seed1"]
    for seed in (0, 1):
        cell = job_dir / f"seed{seed}"
        assert set(json.loads((cell / "state.json").read_text())["done"]) == {"prior", "score"}  # for the run
        ratio = readings[f"seed{seed}"]["ratio"]
        assert ratio == pytest.approx(token_level_first_token_ratio(prior, cell / "data" / "sft.parquet"), rel=1e-4)
        assert readings[f"seed{seed}"]["passed"] is False and f"{ratio:.3g} in seed{seed}" in error
    assert error.startswith("error: gate: variant 'token' (token level, delta_clip [-0.08, 0.3]) weights the first "
                            "response token of 'trace' rows over 'bare' rows by ")
    assert "below gate.min_ratio 1000; stopped before SFT" in error
    assert "models.student.prior.steps, now 4" in error and f"every reading: {job_dir / 'gate.json'}" in error


@pytest.mark.slow  # about 35 s: two runs; test_a_failing_gate_stops_an_experiment_before_sft... checks the same gate
def test_a_single_run_stops_at_its_gate_then_passes_a_lower_one_and_trains(tmp_path):
    run_dir = tmp_path / "run"
    job = ["jobs/pear-vs-sft.yaml", "seeds=[]", "models.student.prior=null", "stages=[score,sft]",
           "sft.variants=[token]", "task.num_train=32", "sft.epochs=1", "sft.batch_size=16", *TINY_STUDENT,
           "--run-dir", str(run_dir)]
    error = failed("run", *job, "gate={variant: token, min_ratio: 1.0e+6}")
    [reading] = json.loads((run_dir / "gate.json").read_text())["readings"].values()
    assert f"{reading['ratio']:.3g} in seed0, below gate.min_ratio 1e+06" in error
    assert "prior" not in error  # the student has none to lengthen
    assert not (run_dir / "models" / "sft-token").exists()
    output = finish(pear_ray("run", *job, "gate={variant: token, min_ratio: 1.0e-6}"))  # the gate binds nothing
    assert "score: done in an earlier run, skipping" in output
    done = json.loads((run_dir / "state.json").read_text())["done"]
    assert done["gate"] == "gate.json" and "sft/token" in done
    assert json.loads((run_dir / "gate.json").read_text())["readings"]["seed0"]["ratio"] == reading["ratio"]


@pytest.mark.slow  # two tiny cells through SFT and eval, about 1.5 minutes; the failing gate above covers the rest
def test_a_passing_gate_lets_every_cell_train_on_the_data_it_scored(tmp_path):
    job_dir = tmp_path / "experiment"
    output = finish(pear_ray("run", "jobs/pear-vs-sft.yaml", *SHARED_PRIOR, "gate={variant: token, min_ratio: 1.0e-6}",
                             "--run-dir", str(job_dir)))
    assert output.count("score: done in an earlier run, skipping") == 2  # the gate scored each cell's data
    assert all(reading["passed"] for reading in json.loads((job_dir / "gate.json").read_text())["readings"].values())
    prior_of_every_cell(job_dir)
    for seed in (0, 1):
        assert json.loads((job_dir / f"seed{seed}" / "state.json").read_text())["done"]["gate"] == "../gate.json"
        assert (job_dir / f"seed{seed}" / "models" / "sft-token" / "model.safetensors").is_file()
    assert (job_dir / "report.md").is_file()


@pytest.mark.slow  # two tiny cells side by side, about 1 minute; the failing gate above shares a prior sequentially
def test_cells_side_by_side_start_from_one_prior_trained_once(tmp_path):
    job_dir = tmp_path / "experiment"
    output = finish(pear_ray("run", "jobs/pear-vs-sft.yaml", *SHARED_PRIOR, "sft.variants=[none]", "parallel_cells=2",
                             "--run-dir", str(job_dir)))
    assert "training the prior seed0-" in output and "shared by 2 cells" in output
    prior = prior_of_every_cell(job_dir)
    assert prior.name.startswith("seed0-") and (prior / "model.safetensors").is_file()
    trained = [len(steps(job_dir / f"seed{seed}", "prior_sft")) for seed in (0, 1)]
    assert trained == [4, 0]  # models.student.prior.steps, in the first cell's folder only
    assert (job_dir / "report.md").is_file()
