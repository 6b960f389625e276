"""The RL stage alone on a tiny model, rewarded by response length (so groups differ): rollouts generated up to
rl.max_staleness versions ahead of the learner, fill_batch, the per-phase figures, and resuming mid-RL."""


from pathlib import Path

import numpy as np
import pytest
import ray
from support.rl import run_rl, samples

from pear_ray.config import RlConfig
from pear_ray.stages import rl as rl_stage
from pear_ray.stages import rl_batch

PHASES = ("generate_seconds", "wait_seconds", "verify_seconds", "train_seconds", "sync_seconds", "step_seconds",
          "rollout_busy", "learner_busy")


# The transformers engine: what these runs check is the stage's bookkeeping, not the engine (vLLM's RL runs are
# test_lora_rl's and the small job's in tests/e2e/test_job.py), and it starts in a fraction of vLLM's time.
FILL = {"fill_batch": True, "fill_max_extra_prompts": 4, "rollout": {"engine": {"backend": "transformers"}}}


@pytest.fixture(scope="module")
def synchronous(ray_cluster, tiny_model_dir, tmp_path_factory):
    """A max_staleness 0 run with fill_batch: its folder, metrics rows and weights."""
    run_dir = tmp_path_factory.mktemp("k0")
    return run_dir, *run_rl(run_dir, tiny_model_dir, max_staleness=0, checkpoint_every=3, **FILL)


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("every", [1, 2, 5])
def test_each_steps_policy_version_depends_on_the_step_alone(k, every):
    """A batch is queued at the first step whose horizon reaches it (actors then at that step's version): at most k
    versions old, never from before its checkpoint interval, so a run resumed at a checkpoint queues it the same."""
    rl = RlConfig(steps=12, max_staleness=k, checkpoint_every=every)
    for start in range(0, 12, every):  # from scratch, and resumed at every checkpoint
        version, queued = {}, start
        for step in range(start, 12):
            for t in range(queued, rl_batch.generation_horizon(step, rl) + 1):
                version[t] = step
            queued = max(queued, rl_batch.generation_horizon(step, rl) + 1)
        assert version == {t: max(t - k, t // every * every) for t in range(start, 12)}


def test_first_groups_keeps_the_first_informative_groups_in_order():
    groups = np.array([0, 0, 1, 1, 2, 2, 3, 3, 7, 7])
    keep = np.array([1, 1, 0, 0, 1, 1, 1, 1, 1, 1], bool)
    assert rl_batch.first_groups(groups, keep, 2).tolist() == [1, 1, 0, 0, 1, 1, 0, 0, 0, 0]
    assert rl_batch.first_groups(groups, keep, 9).tolist() == keep.tolist()


def test_rollouts_ahead_stay_within_the_staleness_bound_and_fill_the_batch(synchronous, tiny_model_dir, tmp_path):
    """k=1 and k=0 on the same prompts and seeds: step 1 is the same (both from the start weights); after it every
    sample k=1 trains on is one version old (its step's own prompts) or current (fill_batch's extra prompts, drawn
    at the step), every sample's version is stored, and each step has prompts_per_step informative groups or
    logs that the cap stopped it."""
    sync_dir, sync_rows, _ = synchronous
    ahead_rows, _ = run_rl(tmp_path / "k1", tiny_model_dir, max_staleness=1, checkpoint_every=3, **FILL)
    assert samples(tmp_path / "k1", 1).equals(samples(sync_dir, 1))
    assert ahead_rows[0]["loss"] == sync_rows[0]["loss"]
    for run_dir, k, rows in ((sync_dir, 0, sync_rows), (tmp_path / "k1", 1, ahead_rows)):
        assert [r["step"] for r in rows] == [1, 2, 3]
        for row in rows:
            table = samples(run_dir, row["step"])
            version = table.column("policy_version").to_numpy()
            own = table.column("group_id").to_numpy() < 2  # the step's own prompts; the rest are fill_batch's
            assert table.column("policy_version").null_count == 0
            assert (version[own] == max(row["step"] - 1 - k, 0)).all() and (version[~own] == row["step"] - 1).all()
            trained = row["step"] - 1 - version[table.column("trained").to_numpy()]
            assert row["staleness_max"] == trained.max() <= k and row["staleness_mean"] == pytest.approx(trained.mean())
            assert row["informative_groups"] == 2 or (row["fill_capped"] == 1 and row["extra_prompts"] == 4)
            assert row["extra_prompts"] == table.num_rows / 4 - 2
            assert all(row[phase] >= 0 for phase in PHASES) and 0 < row["learner_busy"] < 1
    assert max(r["staleness_max"] for r in ahead_rows) == 1


def test_k0_is_the_synchronous_loop(synchronous, tiny_model_dir, tmp_path):
    """max_staleness 1 with a checkpoint every step never runs ahead (a checkpoint interval starts from its own
    weights), so it must equal max_staleness 0 sample for sample and weight for weight. (That k=0 gives the loop's
    figures and weights from before max_staleness existed was checked against that commit: bit for bit.)"""
    sync_dir, sync_rows, sync_weights = synchronous
    drained_rows, drained_weights = run_rl(tmp_path / "k1", tiny_model_dir, max_staleness=1, checkpoint_every=1,
                                           **FILL)
    for step in (1, 2, 3):
        assert samples(tmp_path / "k1", step).equals(samples(sync_dir, step))
    assert [r["loss"] for r in drained_rows] == [r["loss"] for r in sync_rows]
    assert all(np.array_equal(sync_weights[name], drained_weights[name]) for name in sync_weights)


@pytest.mark.slow
def test_resuming_mid_rl_ahead_ends_with_the_same_steps_and_samples(ray_cluster, tiny_model_dir, tmp_path,
                                                                    monkeypatch):
    """k=2, a checkpoint every 2 steps: a run that dies in step 4 resumes from the step-2 checkpoint and ends with
    the uninterrupted run's samples (same policy versions), losses and weights."""
    settings = {"steps": 5, "max_staleness": 2, "checkpoint_every": 2}
    full_rows, full_weights = run_rl(tmp_path / "full", tiny_model_dir, **settings)
    batch = rl_stage.RolloutBatches.batch

    def dies_in_step_4(self, step, *args, **kwargs):
        if step == 3:
            raise RuntimeError("killed")
        return batch(self, step, *args, **kwargs)

    monkeypatch.setattr(rl_stage.RolloutBatches, "batch", dies_in_step_4)
    with pytest.raises(RuntimeError, match="killed"):
        run_rl(tmp_path / "resumed", tiny_model_dir, **settings)
    monkeypatch.setattr(rl_stage.RolloutBatches, "batch", batch)
    resumed_rows, resumed_weights = run_rl(tmp_path / "resumed", tiny_model_dir, resume=True, **settings)
    assert [r["step"] for r in resumed_rows] == [r["step"] for r in full_rows] == [1, 2, 3, 4, 5]
    for step in range(1, 6):
        assert samples(tmp_path / "resumed", step).equals(samples(tmp_path / "full", step))
    assert [r.get("loss") for r in resumed_rows] == [r.get("loss") for r in full_rows]  # none: no update
    assert sum("loss" in r for r in full_rows) >= 2
    assert all(np.array_equal(full_weights[name], resumed_weights[name]) for name in full_weights)


@pytest.mark.slow
def test_samples_from_a_replacement_actors_start_weights_are_counted_and_regenerated(ray_cluster, tiny_model_dir,
                                                                                      tmp_path, monkeypatch):
    """The rollout actor killed while step 3's batch is generated: the pool re-runs it on a new actor, which
    holds the start weights (version 0); the stage counts those samples, syncs and generates the batch again."""
    generated = rl_stage.RolloutBatches.generated

    def kills_the_actor_in_step_3(self, step, *args, **kwargs):
        if step == 2:
            ray.kill(self.pool.actors[0])
        return generated(self, step, *args, **kwargs)

    monkeypatch.setattr(rl_stage.RolloutBatches, "generated", kills_the_actor_in_step_3)
    rows, _ = run_rl(tmp_path, tiny_model_dir, steps=3, drop_constant_groups=False)
    assert [r["stale_regenerated"] for r in rows] == [0, 0, 8] and rows[2]["rollout_actors_lost"] == 1
    assert all(r["staleness_max"] == 0 for r in rows)
    assert samples(tmp_path, 3).column("policy_version").to_pylist() == [2] * 8


@pytest.mark.slow  # about 15 s; tests/unit/test_objectives.py loads a custom objective and uses its terms
def test_a_custom_rl_objective_trains_by_import_path(ray_cluster, tiny_model_dir, tmp_path):
    """rl.objective names a plug-in (tests/support/plugins/objective_example.py): the stage trains with it and logs
    the figures only the plug-in reports, not GRPO's."""
    plugin = Path(__file__).parents[1] / "support" / "plugins" / "objective_example.py"
    objective = {"kind": "custom", "function": f"{plugin}:reinforce", "needs": ["advantage"], "sampled": True,
                 "args": {"scale": 1.0}}
    rows, weights = run_rl(tmp_path, tiny_model_dir, objective=objective, drop_constant_groups=False)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the mean log-prob of the sampled tokens under the learner, per token
    assert all(-20 < r["logp_sum"] < 0 and r["num_tokens"] > 0 for r in rows)
    assert all("clip_fraction" not in r for r in rows)  # not GRPO's surrogate
    assert weights
