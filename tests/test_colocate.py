"""Colocated RL (resources.rollout.colocate): the learner's ranks generate with the weights they train. Same seeds,
same samples: a colocated run must be the split synchronous run (rollout actors, weights synced after each
update), step for step, and resume to its own uninterrupted result."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from pear_ray.config import ConfigError, load_job, parse_job
from pear_ray.stages import rl as rl_stage
from pear_ray.stages.common import Run
from pear_ray.tracking import MetricsLogger, read_metrics

REWARD = Path(__file__).parent / "plugins" / "reward_example.py"
JOBS = Path(__file__).resolve().parents[1] / "jobs"
SAMPLE_COLUMNS = ("id", "group_id", "prompt_ids", "response_ids", "rollout_logprobs", "reward", "advantage",
                  "policy_version", "trained")


def run_rl(run_dir: Path, model: Path, *, colocate: bool, backend: str = "transformers", ranks: int = 1,
           resume: bool = False, **rl) -> tuple[list[dict], dict]:
    """The RL stage alone: its metrics rows and exported weights."""
    job = parse_job({
        "name": "rl", "loggers": [], "models": {"student": {"path": str(model)}},
        "task": {"kind": "addition", "num_train": 16, "num_eval": 2, "reward": f"{REWARD}:length_reward"},
        "sampling": {"temperature": 1.0, "max_tokens": 8},
        "rl": {"steps": 3, "prompts_per_step": 2, "group_size": 4, "optimizer": {"lr": 1e-3}, "save_rollouts": True,
               "checkpoint_every": 2, **rl},
        "resources": {"rollout": {"num_actors": 1, "num_cpus": 0.5, "engine": {"backend": backend},
                                  "colocate": colocate},
                      "learner": {"num_ranks": ranks, "num_cpus": 0.5}},
    })
    with MetricsLogger(run_dir, resume=resume, loggers=()) as metrics:
        out = rl_stage.run_rl(Run(job, run_dir, metrics, model), "none", model)
    rows = sorted((r for r in read_metrics(run_dir) if r["stage"] == "rl"), key=lambda r: r["step"])
    return rows, load_file(str(out / "model.safetensors"))


def samples(run_dir: Path, step: int):
    return pq.read_table(run_dir / "rollouts" / "rl-none" / f"step-{step:06d}.parquet").select(SAMPLE_COLUMNS)


@pytest.fixture(scope="module")
def split(ray_cluster, tiny_model_dir, tmp_path_factory):
    """The split synchronous run: one transformers rollout actor, weights synced after every update."""
    run_dir = tmp_path_factory.mktemp("split")
    return run_dir, *run_rl(run_dir, tiny_model_dir, colocate=False)


def test_colocated_rl_is_the_split_synchronous_run(split, tiny_model_dir, tmp_path):
    """Every step's samples (ids, log-probs, rewards, advantages, versions), every loss and the final weights."""
    split_dir, split_rows, split_weights = split
    rows, weights = run_rl(tmp_path, tiny_model_dir, colocate=True)
    for step in (1, 2, 3):
        assert samples(tmp_path, step).equals(samples(split_dir, step))
    for key in ("reward", "loss", "grad_norm", "trained_samples"):
        assert [r[key] for r in rows] == [r[key] for r in split_rows]
    assert all(np.array_equal(weights[name], split_weights[name]) for name in split_weights)
    assert all(r["mismatch_max"] == 0.0 for r in rows)  # the engine serves the very module that trains
    assert all(r["rollout_actors"] == 1 for r in rows)


def test_colocated_rl_resumes_to_the_uninterrupted_result(split, tiny_model_dir, tmp_path, monkeypatch):
    """Killed in step 3, after the step-2 checkpoint: the rerun loads it and ends as the uninterrupted run."""
    split_dir, split_rows, split_weights = split
    batch = rl_stage.RolloutBatches.batch

    def dies_in_step_3(self, step):
        if step == 2:
            raise RuntimeError("killed")
        return batch(self, step)

    monkeypatch.setattr(rl_stage.RolloutBatches, "batch", dies_in_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        run_rl(tmp_path, tiny_model_dir, colocate=True)
    monkeypatch.setattr(rl_stage.RolloutBatches, "batch", batch)
    rows, weights = run_rl(tmp_path, tiny_model_dir, colocate=True, resume=True)
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
    split_rows, split_weights = run_rl(tmp_path / "split", tiny_model_dir, colocate=False, backend=backend, ranks=2)
    rows, weights = run_rl(tmp_path / "colocated", tiny_model_dir, colocate=True, backend=backend, ranks=2)
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
