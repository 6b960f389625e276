"""Elastic rollout pool in real Ray (one node; tests/e2e/test_submit.py and tests/e2e/test_autoscaling.py run it on
a cluster that Ray's autoscaler grows and shrinks): the pool starts one more actor while the cluster has room for
it, up to max_actors, lets it take work only once it is up, goes on without an actor it lost (its node left) instead
of replacing it, and lets an actor it releases by plan finish its work first; the scaler (actors/elastic.py) acts
on what the rule (actors/scaling.py) decides."""

import time

import pyarrow as pa
import pytest
import ray
from support.rl import run_rl
from transformers import AutoTokenizer

from pear_ray.actors.elastic import PoolScaler, grow_rollout_pool, scaled_by_results
from pear_ray.actors.pool import ActorPool
from pear_ray.actors.roles import rollout_pool
from pear_ray.actors.rollout import RolloutWorker
from pear_ray.config import PoolScaling, RolloutResources
from pear_ray.data.io import encode_prompt

ELASTIC = RolloutResources(num_actors=1, max_actors=2, num_cpus=0.25)
BY_WAIT = ELASTIC.model_copy(update={"scale": PoolScaling(by="wait", window=2)})
RL_STEPS = 100  # a tiny RL step takes a fraction of a second: enough of them for an actor to start meanwhile


@pytest.fixture(scope="module")
def prompt_refs(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    table = pa.table({"id": [str(i) for i in range(8)],
                      "prompt_ids": [encode_prompt(tokenizer, f"Calculate {i} + 1.") for i in range(8)]})
    return [ray.put(table.slice(i, 1)) for i in range(8)]


def _grow_for(pool: ActorPool, resources: RolloutResources, seconds: float, until_actors: int = 0) -> list[int]:
    """Call grow_rollout_pool as the RL loop does, once per 'step', for a while or until the pool has
    `until_actors` working actors; returns the slots that came up."""
    came_up, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline and len(pool.actors) != until_actors:
        came_up += grow_rollout_pool(pool, resources)
        time.sleep(0.2)
    return came_up


@pytest.mark.slow  # about 30 s: vLLM actors started one by one; test_autoscaling grows a pool in the default suite
def test_pool_grows_to_max_actors_while_the_cluster_has_room(ray_cluster, tiny_model_dir):
    fixed_resources = RolloutResources(num_actors=1, num_cpus=0.25)
    too_big = RolloutResources(num_actors=1, max_actors=2, num_cpus=0.25, resources={"no_such_node": 1})
    fixed = rollout_pool(tiny_model_dir, fixed_resources, seed=0)
    elastic = rollout_pool(tiny_model_dir, ELASTIC, seed=0)
    try:
        assert _grow_for(fixed, fixed_resources, 3) == [] and len(fixed.slots) == 1  # not elastic
        assert _grow_for(elastic, ELASTIC, 60, until_actors=2) == [1]  # one more actor came up...
        assert _grow_for(elastic, ELASTIC, 2) == [] and len(elastic.slots) == 2  # ...and none past max_actors
        assert all(h["alive"] for h in elastic.call_all("health"))
        assert _grow_for(fixed, too_big, 3) == [] and len(fixed.slots) == 1  # no room for that resource
    finally:
        fixed.shutdown()
        elastic.shutdown()


@pytest.mark.slow  # about 20 s: three vLLM actors started
def test_an_added_actor_takes_work_only_once_activated_and_one_that_never_starts_is_dropped(
        ray_cluster, tiny_model_dir, prompt_refs):
    worker = ray.remote(RolloutWorker)

    def make_actor(slot: int):  # slot 2 asks for a resource no node has: it never starts
        needs = {"resources": {"no_such_node": 1}} if slot == 2 else {}
        return worker.options(num_cpus=0.25, **needs).remote(str(tiny_model_dir), seed=slot)

    pool = ActorPool.start(make_actor, 1, min_size=1)
    try:
        assert pool.add_actor() == 1
        ray.get(pool.slots[1].ready)  # up, but not activated: it must not be given work yet
        assert len(list(pool.map("generate", prompt_refs, n=1, max_tokens=2, seed=0))) == len(prompt_refs)
        assert pool.stats.per_actor_completed == {0: len(prompt_refs)}
        assert pool.activate_started(timeout_s=60) == [1]
        assert pool.add_actor() == 2
        assert not pool.settled()
        time.sleep(1.0)
        assert pool.activate_started(timeout_s=0.5) == [] and sorted(pool.slots) == [0, 1]  # dropped
        assert pool.settled()
        list(pool.map("generate", prompt_refs, n=1, max_tokens=2, seed=0))
        assert pool.stats.per_actor_completed[1] > 0
    finally:
        pool.shutdown()


@pytest.fixture
def grown_pool(ray_cluster, tiny_model_dir) -> ActorPool:
    """An elastic pool grown from one actor to two (slots 0 and 1)."""
    pool = rollout_pool(tiny_model_dir, ELASTIC, seed=0)
    try:
        assert _grow_for(pool, ELASTIC, 60, until_actors=2) == [1]
        yield pool
    finally:
        pool.shutdown()


@pytest.mark.slow  # about 20 s (its grown pool); test_rollout's killed actor is the default suite's
def test_elastic_pool_goes_on_without_a_lost_actor(grown_pool, prompt_refs):
    pool = grown_pool
    seen = []
    for index, batch_ref, _ in pool.map("generate", prompt_refs, n=2, max_tokens=4, seed=0):
        seen.append(index)
        assert ray.get(batch_ref).num_rows == 2
        if len(seen) == 1:
            ray.kill(pool.slots[1].actor)  # as if its node left
    assert sorted(seen) == list(range(len(prompt_refs)))  # every batch exactly once
    assert list(pool.slots) == [0] and pool.stats.actors_dropped == 1 and pool.stats.actors_replaced == 0
    assert len(pool.call_all("health")) == 1


@pytest.mark.slow  # about 20 s (its grown pool); test_autoscaling releases actors in the default suite
def test_an_actor_released_by_plan_finishes_its_work_then_leaves(grown_pool, prompt_refs):
    pool = grown_pool
    mapping = pool.submit("generate", prompt_refs, n=2, max_tokens=4, seed=0)  # every item handed out now
    given = pool.stats.submitted
    assert pool.slots[1].load > 0
    leaving = pool.slots[1].actor
    pool.retire(1)
    assert len(pool.actors) == 1 and pool.members.leaving[0].actor is leaving  # its calls are in flight
    assert ray.get(leaving.health.remote()) is not None  # it is still there to answer them
    seen = [index for index, batch_ref, _ in mapping if ray.get(batch_ref).num_rows == 2]
    assert sorted(seen) == list(range(len(prompt_refs)))  # every batch once, the retiring actor's included
    assert pool.stats.submitted == given and pool.stats.resubmitted == 0  # none run twice
    assert pool.stats.per_actor_completed[1] > 0
    assert pool.members.leaving == [] and list(pool.slots) == [0]  # its last answer let it go
    assert pool.activate_started(timeout_s=60) == []  # a released actor never takes work again
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(leaving.health.remote())
    list(pool.map("generate", prompt_refs, n=1, max_tokens=2, seed=0))
    assert pool.stats.per_actor_completed[0] == 2 * len(prompt_refs) - pool.stats.per_actor_completed[1]


def test_the_scaler_asks_for_one_more_actor_while_waited_on_and_releases_one_when_idle(ray_cluster, tiny_model_dir):
    pool = rollout_pool(tiny_model_dir, BY_WAIT, seed=0)
    scaler = PoolScaler(pool, BY_WAIT, "test")
    try:
        assert scaler.requested == 1
        scaler.decide(0.9, 0.9)
        assert scaler.requested == 1  # one step is not a window
        figures = scaler.observe(0.9, 0.9)
        assert scaler.requested == 2 and figures["rollout_requested"] == 2 and figures["rollout_wait_share"] == 0.9
        assert figures["nodes_up"] == 1
        deadline = time.monotonic() + 60
        while not scaler.grow():
            assert time.monotonic() < deadline, "the actor asked for never came up"
            time.sleep(0.2)
        assert len(pool.actors) == 2 and len(scaler.scale_up_seconds) == 1
        assert 0 < scaler.observe(0.0, 0.9)["rollout_scale_up_seconds"] < 60
        scaler.decide(0.9, 0.9)  # waited again, but the pool is at max_actors
        assert scaler.requested == 2
        scaler.decide(0.0, 0.2)
        scaler.decide(0.0, 0.2)  # busy 0.2 with 2 actors: 0.4 with one, below shrink_at
        assert scaler.requested == 1 and list(pool.slots) == [0]  # the newest retired
        assert pool.members.leaving == []  # it had nothing in flight: gone at once
    finally:
        scaler.close()
        pool.shutdown()


@pytest.mark.slow  # about 30 s; the scaler's own test and RL's scaling stay in the default suite
def test_a_pool_waited_on_during_a_map_grows_mid_map(ray_cluster, tiny_model_dir, prompt_refs):
    pool = rollout_pool(tiny_model_dir, BY_WAIT, seed=0)
    try:
        items = prompt_refs * 100  # more work than the map needs: it stops once the new actor has done some
        with scaled_by_results(pool, BY_WAIT, "test") as scaler:
            for _ in pool.map("generate", items, n=4, max_tokens=8, seed=0):
                if pool.stats.per_actor_completed.get(1, 0) >= 2:
                    break
        assert pool.stats.completed < len(items), "the pool did not grow before the map ended"
        assert scaler.requested == 2 and scaler.peak == 2  # the driver only waited: it asked for one more
        assert pool.dispatcher.on_result is None and pool.stats.wait_seconds > 0
        with scaled_by_results(pool, ELASTIC, "test") as not_by_wait:
            assert not_by_wait is None and pool.dispatcher.on_result is None
    finally:
        pool.shutdown()


@pytest.mark.slow  # about 25 s; test_the_scaler_asks_for_one_more_actor_while_waited_on... covers the scaler
def test_rl_sizes_a_waited_on_pool_by_wait_and_logs_the_scaling_figures_every_step(ray_cluster, tiny_model_dir,
                                                                                    tmp_path):
    # grow_at 0.01: every step counts as waited on (the rule's thresholds are tests/unit/test_scaling.py's business;
    # here: the RL stage feeds the scaler and acts on it)
    scale = {"by": "wait", "window": 2, "grow_at": 0.01, "shrink_at": 0.01}
    rows, _ = run_rl(tmp_path, tiny_model_dir, steps=RL_STEPS, checkpoint_every=RL_STEPS,
                     rollout={"num_cpus": 0.25, "max_actors": 2, "scale": scale, "engine": {"backend": "transformers"}})
    assert [r["step"] for r in rows] == list(range(1, RL_STEPS + 1)) and all(r["samples"] == 2 * 4 for r in rows)
    assert all(0 <= r["rollout_wait_share"] <= 1 and r["nodes_up"] == 1 for r in rows)
    assert [r["rollout_requested"] for r in rows[:3]] == [1, 2, 2]  # asked for one more after a window of 2 steps
    actors = [r["rollout_actors"] for r in rows]
    assert actors == sorted(actors) and actors[-1] == 2, actors  # it came up and stayed: never idle by 0.01
    came_up = [r for r in rows if "rollout_scale_up_seconds" in r]
    assert len(came_up) == 1 and came_up[0]["rollout_actors"] == 2 and came_up[0]["rollout_scale_up_seconds"] > 0
