"""SFT data streamed to the learner ranks through Ray Data: each rank gets exactly the rows of its shard of every
step that a whole batch cut by the rank would give (the seeded plan, resumed at any step), and training on the
stream is bit-identical to training on whole-batch refs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from support.learner import OPTIMIZER, make_batch

from pear_ray.actors import data_stream
from pear_ray.actors.learner import STREAMED, LearnerGroup, LearnerWorker
from pear_ray.config import LearnerResources
from pear_ray.data.rows import read_rows, regroup
from pear_ray.objectives import PearSft
from pear_ray.stages.sft import batch_plan

NUM_ROWS, BATCH_SIZE, EPOCHS, SEED = 19, 6, 2, 3  # per epoch 6, 6, 6, 1; over 2 ranks the 1 joins the 6 before


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Training rows in row groups of 4, so reads pick rows out of several groups."""
    path = tmp_path_factory.mktemp("stream") / "sft.parquet"
    pq.write_table(make_batch(NUM_ROWS, seed=21), path, row_group_size=4)
    return path


def test_read_rows_gives_rows_in_the_order_asked_repeats_included(data_file):
    whole = pq.read_table(data_file)
    rows = np.array([17, 0, 5, 5, 18, 3, 12])
    assert read_rows(data_file, rows).equals(whole.take(rows))
    with pytest.raises(IndexError, match="file of 19 rows"):
        read_rows(data_file, np.array([3, 19]))


def test_regroup_cuts_rows_into_groups_whatever_the_blocks():
    blocks = [pa.table({"x": np.arange(start, end)}) for start, end in [(0, 2), (2, 3), (3, 9), (9, 10)]]
    groups = list(regroup(blocks, [3, 1, 4, 2]))
    assert [group.column("x").to_pylist() for group in groups] == [[0, 1, 2], [3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError, match="1 row\\(s\\) short"):
        list(regroup(blocks, [6, 5]))


@pytest.mark.parametrize(("world_size", "start"), [(1, 0), (2, 4)])  # 2 ranks from a resume step: uneven shards
def test_each_rank_streams_the_rows_of_its_shard_of_every_step_from_the_start_step(
        ray_cluster, data_file, monkeypatch, world_size, start):
    monkeypatch.setattr(data_stream, "BLOCK_BYTES", 700)  # a few rows a block: blocks straddle steps
    plan = batch_plan(NUM_ROWS, BATCH_SIZE, EPOCHS, SEED, min_rows=world_size)
    assert [len(batch) for batch in plan] == ([6, 6, 6, 1] if world_size == 1 else [6, 6, 7]) * EPOCHS
    whole = pq.read_table(data_file)
    ranks = [LearnerWorker(rank, world_size) for rank in range(world_size)]
    for rank in ranks:
        rank.open_stream(str(data_file), plan[start:])
    for step in range(start, len(plan)):
        for rank in ranks:
            expected = rank._shard(whole.take(plan[step]), "the plan's batch")
            assert next(rank.stream).equals(expected), f"step {step}, rank {rank.rank} of {world_size}"
    assert all(next(rank.stream, None) is None for rank in ranks)


def test_training_on_the_stream_equals_training_on_whole_batches(ray_cluster, tiny_model_dir, data_file):
    """Two ranks, uneven shards (7 rows: 4 + 3): the same losses and weights, bit for bit."""
    plan = batch_plan(NUM_ROWS, BATCH_SIZE, 1, SEED, min_rows=2)
    objective = PearSft(level="token", gamma=0.99)
    whole = pq.read_table(data_file)
    results = {}
    for path in ("refs", "stream"):
        group = LearnerGroup(tiny_model_dir, LearnerResources(num_ranks=2, num_cpus=0.25), **OPTIMIZER)
        try:
            if path == "refs":
                losses = [group.step(ray.put(whole.take(batch)), objective)["loss"] for batch in plan]
            else:
                group.stream(data_file, plan)
                losses = [group.step(STREAMED, objective)["loss"] for _ in plan]
            results[path] = losses, group.parameter_checksums()
        finally:
            group.shutdown()
    assert results["stream"] == results["refs"]
