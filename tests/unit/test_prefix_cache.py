"""The transformers engine's prefix cache (PrefixCache): longest shared prefix by whole blocks then id by id, the
last id always left to run, least recently used dropped past the byte budget."""

import torch

from pear_ray.engines.transformers_engine import PrefixCache

BLOCK = PrefixCache.BLOCK


def kv(length, value):
    """One layer's (keys, values) of `length` positions, every entry `value` (2 heads, head size 4, fp32)."""
    return [(torch.full((2, length, 4), float(value)), torch.full((2, length, 4), -float(value)))]


def test_the_longest_shared_prefix_is_found_and_cut_to_it():
    cache = PrefixCache(budget_bytes=2**20)
    first, second = list(range(40)), list(range(20)) + [99] * 20
    cache.put(first, kv(40, 1))
    cache.put(second, kv(40, 2))
    shared, [(keys, values)] = cache.longest(list(range(35)) + [7, 7])
    assert shared == 35 and keys.shape == (2, 35, 4) and bool((keys == 1).all()) and bool((values == -1).all())
    assert cache.longest(list(range(20)) + [99] * 5)[0] == 24  # the last id is left to run
    assert cache.longest(list(range(BLOCK - 1)) + [500, 501])[0] == 0  # less than a whole block shared
    assert cache.longest([5] * 40) == (0, None)


def test_least_recently_used_entries_go_past_the_budget():
    entry_bytes = 2 * 2 * BLOCK * 2 * 4 * 4  # keys and values of 2 * BLOCK positions
    cache = PrefixCache(budget_bytes=2 * entry_bytes)
    a, b, c = ([token] * 2 * BLOCK for token in (1, 2, 3))
    cache.put(a, kv(2 * BLOCK, 1))
    cache.put(b, kv(2 * BLOCK, 2))
    assert cache.longest(a + [0])[0] == 2 * BLOCK  # a is now the most recently used
    cache.put(c, kv(2 * BLOCK, 3))
    assert [cache.longest(ids + [0])[0] for ids in (a, b, c)] == [2 * BLOCK, 0, 2 * BLOCK]
    assert cache.bytes == 2 * entry_bytes and len(cache.blocks) == 4
    cache.clear()
    assert cache.longest(a + [0]) == (0, None) and cache.bytes == 0
