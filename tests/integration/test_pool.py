"""The pool's dispatch in real Ray, over reference actors on the tiny model: `map` pulls items only as the actors'
capacity frees up (at most max_in_flight each), `submit` hands out every item at once, every item comes back once
with its own batch, and a mapping makes progress while another's eager items hold every slot.
(tests/test_lost_actors.py and tests/test_elastic.py have the actors that are lost, replaced, added and dropped.)"""

import numpy as np
import pyarrow as pa
import pytest
import ray

from pear_ray.actors.pool import ActorPool
from pear_ray.actors.roles import reference_actor
from pear_ray.config import ActorResources
from pear_ray.data import schema

REFERENCE = ActorResources(num_cpus=0.25)


@pytest.fixture(scope="module")
def batches() -> list[pa.Table]:
    """Twelve (prompt, response) batches of two rows, each with its own ids."""
    rng = np.random.default_rng(0)
    return [pa.table({schema.ID: [f"{b}/{r}" for r in range(2)],
                      schema.PROMPT_IDS: rng.integers(3, 300, (2, 5)).tolist(),
                      schema.RESPONSE_IDS: rng.integers(3, 300, (2, 4)).tolist()}) for b in range(12)]


@pytest.fixture(scope="module")
def batch_refs(ray_cluster, batches) -> list[ray.ObjectRef]:
    return [ray.put(batch) for batch in batches]


def reference_pool_of(tiny_model_dir, size: int, max_in_flight: int) -> ActorPool:
    return ActorPool.start(lambda slot: reference_actor(tiny_model_dir, REFERENCE), size, max_in_flight=max_in_flight,
                     role="reference")


class Counted:
    """An iterable that counts the items taken from it so far."""

    def __init__(self, items: list):
        self.items, self.taken = items, 0

    def __iter__(self):
        for item in self.items:
            self.taken += 1
            yield item


def test_map_takes_items_only_as_the_actors_free_up_and_returns_each_once(ray_cluster, tiny_model_dir, batches,
                                                                         batch_refs):
    pool = reference_pool_of(tiny_model_dir, size=2, max_in_flight=2)
    try:
        items, in_flight, seen = Counted(batch_refs), [], []
        for index, batch_ref, stats in pool.map("score", items):
            in_flight.append(items.taken - len(seen))  # taken and not yet returned, this one included
            seen.append(index)
            assert ray.get(batch_ref).column(schema.ID).equals(batches[index].column(schema.ID))
            assert stats["rows"] == 2
        assert sorted(seen) == list(range(len(batch_refs)))
        assert max(in_flight) == 4  # two actors, two items each: no more, and both filled
        assert pool.stats.completed == pool.stats.submitted == len(batch_refs)
        assert sorted(pool.stats.per_actor_completed) == [0, 1]
    finally:
        pool.shutdown()


def test_submit_hands_out_every_item_at_once_with_its_refs_in_item_order(ray_cluster, tiny_model_dir, batches,
                                                                         batch_refs):
    pool = reference_pool_of(tiny_model_dir, size=1, max_in_flight=1)
    try:
        items = Counted(batch_refs[:6])
        submitted = pool.submit("score", items)
        assert items.taken == 6  # before anything is iterated
        refs = submitted.refs()
        assert [ray.get(ref).column(schema.ID).to_pylist() for ref in refs] == [batch.column(schema.ID).to_pylist()
                                                                           for batch in batches[:6]]
        assert sorted(index for index, _, _ in submitted) == list(range(6))
    finally:
        pool.shutdown()


def test_a_mapping_goes_on_while_another_ones_items_hold_every_slot(ray_cluster, tiny_model_dir, batch_refs):
    pool = reference_pool_of(tiny_model_dir, size=1, max_in_flight=1)
    try:
        ahead = pool.submit("score", batch_refs[:4])
        assert sorted(index for index, _, _ in pool.map("score", batch_refs[4:6])) == [0, 1]
        assert sorted(index for index, _, _ in ahead) == [0, 1, 2, 3]
        assert pool.stats.completed == 6
    finally:
        pool.shutdown()
