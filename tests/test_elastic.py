"""Elastic rollout pool in real Ray: it grows while the cluster has room for another rollout actor, up to
max_actors, and an elastic pool goes on without an actor it lost (its node left) instead of replacing it."""

import pyarrow as pa
import pytest
import ray
from transformers import AutoTokenizer

from pear_ray.config import RolloutResources
from pear_ray.data.io import encode_prompt
from pear_ray.driver.roles import grow_rollout_pool, rollout_pool


@pytest.fixture(scope="module")
def prompt_refs(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    table = pa.table({"id": [str(i) for i in range(8)],
                      "prompt_ids": [encode_prompt(tokenizer, f"Calculate {i} + 1.") for i in range(8)]})
    return [ray.put(table.slice(i, 1)) for i in range(8)]


def test_pool_grows_to_max_actors_while_the_cluster_has_room(ray_cluster, tiny_model_dir):
    fixed_resources = RolloutResources(num_actors=1, num_cpus=0.25)
    elastic_resources = RolloutResources(num_actors=1, max_actors=2, num_cpus=0.25)
    too_big = RolloutResources(num_actors=1, max_actors=2, num_cpus=0.25, resources={"no_such_node": 1})
    fixed = rollout_pool(tiny_model_dir, fixed_resources, seed=0)
    elastic = rollout_pool(tiny_model_dir, elastic_resources, seed=0)
    try:
        assert grow_rollout_pool(fixed, fixed_resources) == 1  # not elastic
        assert grow_rollout_pool(elastic, elastic_resources) == 2
        assert grow_rollout_pool(elastic, elastic_resources) == 2  # never past max_actors
        assert all(h["alive"] for h in elastic.call_all("health"))
        assert grow_rollout_pool(fixed, too_big) == 1  # no room for that resource: nothing added
    finally:
        fixed.shutdown()
        elastic.shutdown()


def test_elastic_pool_goes_on_without_a_lost_actor(ray_cluster, tiny_model_dir, prompt_refs):
    pool = rollout_pool(tiny_model_dir, RolloutResources(num_actors=1, max_actors=2, num_cpus=0.25), seed=0)
    try:
        grow_rollout_pool(pool, RolloutResources(num_actors=1, max_actors=2, num_cpus=0.25))
        lost_slot = max(pool.slots)
        seen = []
        for index, batch_ref, _ in pool.map("generate", prompt_refs, n=2, max_tokens=4, seed=0):
            seen.append(index)
            assert ray.get(batch_ref).num_rows == 2
            if len(seen) == 1:
                ray.kill(pool.slots[lost_slot].actor)  # as if its node left
        assert sorted(seen) == list(range(len(prompt_refs)))  # every batch exactly once
        assert list(pool.slots) == [0] and pool.stats.actors_dropped == 1 and pool.stats.actors_replaced == 0
        assert len(pool.call_all("health")) == 1
    finally:
        pool.shutdown()
