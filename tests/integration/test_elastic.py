"""Elastic rollout pool in real Ray (one node; tests/test_submit.py has a node joining and leaving): the pool
starts one more actor while the cluster has room for it, up to max_actors, lets it take work only once it is up,
and an elastic pool goes on without an actor it lost (its node left) instead of replacing it."""

import time

import pyarrow as pa
import pytest
import ray
from transformers import AutoTokenizer

from pear_ray.actors.pool import ActorPool
from pear_ray.actors.roles import grow_rollout_pool, rollout_pool
from pear_ray.actors.rollout import RolloutWorker
from pear_ray.config import RolloutResources
from pear_ray.data.io import encode_prompt

ELASTIC = RolloutResources(num_actors=1, max_actors=2, num_cpus=0.25)


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


def test_elastic_pool_goes_on_without_a_lost_actor(ray_cluster, tiny_model_dir, prompt_refs):
    pool = rollout_pool(tiny_model_dir, ELASTIC, seed=0)
    try:
        assert _grow_for(pool, ELASTIC, 60, until_actors=2) == [1]
        seen = []
        for index, batch_ref, _ in pool.map("generate", prompt_refs, n=2, max_tokens=4, seed=0):
            seen.append(index)
            assert ray.get(batch_ref).num_rows == 2
            if len(seen) == 1:
                ray.kill(pool.slots[1].actor)  # as if its node left
        assert sorted(seen) == list(range(len(prompt_refs)))  # every batch exactly once
        assert list(pool.slots) == [0] and pool.stats.actors_dropped == 1 and pool.stats.actors_replaced == 0
        assert len(pool.call_all("health")) == 1
    finally:
        pool.shutdown()
