"""Training rows streamed from a Parquet file through Ray Data, so no process and no object holds the whole file.

A learner rank asks for the rows of its shard of every step to come (row indices, in step order); a Ray Data
datasource cuts that index sequence into read tasks of about BLOCK_BYTES of data each, a task reads its rows (only
the row groups they fall in: `data.rows.read_rows`), and the blocks come back in order, at most READ_CONCURRENCY
tasks ahead of the consumer, which regroups them into one table per step.

The rows are drawn at random over the file, so a task reads whole row groups to keep a few of their rows: training
data is best written in small row groups (the score stage writes groups of `score.batch_size` rows).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import Datasource, ReadTask, TaskPoolStrategy
from ray.data.block import BlockMetadata

from pear_ray.data.rows import read_rows, regroup
from pear_ray.storage import materialize

BLOCK_BYTES = 8 << 20  # data per read task: a few blocks in flight stay well inside a small object store
READ_CPUS = 0.1  # the reads are light; a whole CPU each would wait behind the learner ranks' reservations
READ_CONCURRENCY = 2  # read tasks in flight per stream: one ahead of the one being consumed


class ParquetRows(Datasource):
    """Given rows of a Parquet file, in the order given: each read task reads a contiguous run of them."""

    def __init__(self, path: str | Path, rows: np.ndarray):
        self.path, self.rows = str(path), np.asarray(rows, dtype=np.int64)
        metadata = pq.ParquetFile(materialize(path)).metadata
        groups = [metadata.row_group(i) for i in range(metadata.num_row_groups)]
        self.row_bytes = sum(group.total_byte_size for group in groups) / max(1, metadata.num_rows)

    def estimate_inmemory_data_size(self) -> int:
        return int(len(self.rows) * self.row_bytes)

    def blocks(self) -> int:
        """How many read tasks give blocks of about BLOCK_BYTES."""
        return int(np.clip(np.ceil(self.estimate_inmemory_data_size() / BLOCK_BYTES), 1, max(1, len(self.rows))))

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        return [ReadTask(partial(_read_block, self.path, chunk),
                         BlockMetadata(num_rows=len(chunk), size_bytes=int(len(chunk) * self.row_bytes),
                                       input_files=[self.path], exec_stats=None),
                         per_task_row_limit=per_task_row_limit)
                for chunk in np.array_split(self.rows, parallelism) if len(chunk)]


def _read_block(path: str, rows: np.ndarray) -> list[pa.Table]:
    return [read_rows(materialize(path), rows)]  # a read task runs on any node: a file in a bucket is fetched to it


def stream_rows(path: str | Path, groups: list[np.ndarray]) -> Iterator[pa.Table]:
    """The rows of each group (row indices into the Parquet file at `path`), one table per group, in order."""
    source = ParquetRows(path, np.concatenate(groups))
    blocks = source.blocks()
    dataset = ray.data.read_datasource(source, override_num_blocks=blocks, num_cpus=READ_CPUS,
                                       compute=TaskPoolStrategy(size=min(READ_CONCURRENCY, blocks)))
    dataset.context.execution_options.preserve_order = True  # the seeded order is the point
    dataset.context.enable_progress_bars = False
    return regroup(dataset.iter_batches(batch_size=None, batch_format="pyarrow"), [len(group) for group in groups])
