"""Colocated RL (resources.rollout.colocate): the learner's ranks generate with the weights they train. Same seeds,
same samples: a colocated run must be the split synchronous run (rollout actors, weights synced after each
update), step for step, and resume to its own uninterrupted result."""

from pathlib import Path

import numpy as np
import pytest
from support.rl import run_rl, samples, stopped_in_step

from pear_ray.config import ConfigError, load_job

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def run(run_dir: Path, model: Path, *, colocate: bool, backend: str = "transformers", **kwargs):
    """The RL stage alone (support.rl), checkpointed every 2 steps, with its generation colocated or split."""
    return run_rl(run_dir, model, rollout={"engine": {"backend": backend}, "colocate": colocate}, checkpoint_every=2,
                  **kwargs)


@pytest.fixture(scope="module")
def split(ray_cluster, tiny_model_dir, tmp_path_factory):
    """The split synchronous run: one transformers rollout actor, weights synced after every update."""
    run_dir = tmp_path_factory.mktemp("split")
    return run_dir, *run(run_dir, tiny_model_dir, colocate=False)


def test_colocated_rl_is_the_split_synchronous_run(split, tiny_model_dir, tmp_path):
    """Every step's samples (ids, log-probs, rewards, advantages, versions), every loss and the final weights."""
    split_dir, split_rows, split_weights = split
    rows, weights = run(tmp_path, tiny_model_dir, colocate=True)
    for step in (1, 2, 3):
        assert samples(tmp_path, step).equals(samples(split_dir, step))
    for key in ("reward", "loss", "grad_norm", "trained_samples"):
        assert [r[key] for r in rows] == [r[key] for r in split_rows]
    assert all(np.array_equal(weights[name], split_weights[name]) for name in split_weights)
    assert all(r["mismatch_max"] == 0.0 for r in rows)  # the engine serves the very module that trains
    assert all(r["rollout_actors"] == 1 for r in rows)


@pytest.mark.slow  # about 10 s; every RL resume goes through the same loop (test_run_folder)
def test_colocated_rl_resumes_to_the_uninterrupted_result(split, tiny_model_dir, tmp_path, monkeypatch):
    """Killed in step 3, after the step-2 checkpoint: the rerun loads it and ends as the uninterrupted run."""
    split_dir, split_rows, split_weights = split
    with stopped_in_step(monkeypatch, 3):
        run(tmp_path, tiny_model_dir, colocate=True)
    rows, weights = run(tmp_path, tiny_model_dir, colocate=True, resume=True)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert samples(tmp_path, 3).equals(samples(split_dir, 3))
    assert [r["loss"] for r in rows] == [r["loss"] for r in split_rows]
    assert all(np.array_equal(weights[name], split_weights[name]) for name in split_weights)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_two_ranks_generate_their_shares_as_the_rollout_actors_would(ray_cluster, tiny_model_dir, tmp_path, backend):
    """Two ranks each generate half the prompts (each prompt has its own seed, so the split does not matter) and
    train on their shards: the same samples and losses as the split run with the same two-rank learner; vLLM holds
    a copy of each rank's weights, reloaded in place after every update, and agrees to its numerics."""
    split_rows, split_weights = run(tmp_path / "split", tiny_model_dir, colocate=False, backend=backend, ranks=2)
    rows, weights = run(tmp_path / "colocated", tiny_model_dir, colocate=True, backend=backend, ranks=2)
    for step in (1, 2, 3):
        assert samples(tmp_path / "colocated", step).equals(samples(tmp_path / "split", step))
    assert [r["loss"] for r in rows] == [r["loss"] for r in split_rows]
    assert all(np.array_equal(weights[name], split_weights[name]) for name in split_weights)
    assert all(r["rollout_actors"] == 2 and r["mismatch_max"] < 1e-5 for r in rows)


@pytest.mark.parametrize(("overrides", "expected"), [
    (["resources.learner.zero_stage=3"], "ZeRO-3 partitions them"),
    (["resources.rollout.max_actors=2"], "the rollout pool is the learner's ranks and cannot grow"),
])
def test_what_colocated_generation_cannot_do_is_refused_when_the_job_loads(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_job(JOBS / "smoke.yaml", ["resources.rollout.colocate=true", *overrides])
