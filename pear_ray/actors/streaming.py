"""Streaming a Parquet dataset through an actor pool and back to Parquet, with the driver holding only refs.

Row groups are read by Ray tasks, transformed by the pool, and written in order by a sink actor; the pool's
in-flight bound and a bounded queue of pending writes keep object-store and driver memory flat however
large the dataset. Size row groups so that about (2 x actors x max_in_flight + max_pending_writes) of them,
inputs and outputs, fit in the object store, or Ray spills to disk (measured: benchmarks/bench_streaming.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pear_ray import atomic
from pear_ray.actors.pool import ActorPool


@ray.remote(num_cpus=0.1)
def read_row_group(path: str, index: int) -> pa.Table:
    return pq.ParquetFile(path).read_row_group(index)


class ParquetSink:
    """Writes batches to one Parquet file in input order, whatever order they finish in."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.partial = atomic.partial_name(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer: pq.ParquetWriter | None = None
        self.waiting: dict[int, pa.Table] = {}
        self.next_index = 0
        self.rows = 0

    def write(self, index: int, table: pa.Table) -> int:
        self.waiting[index] = table
        while self.next_index in self.waiting:
            batch = self.waiting.pop(self.next_index)
            if self.writer is None:
                self.writer = pq.ParquetWriter(self.partial, batch.schema)
            self.writer.write_table(batch)
            self.rows += batch.num_rows
            self.next_index += 1
        return self.rows

    def close(self) -> int:
        """Finish the file and move it into place (a crash leaves only the .partial file)."""
        if self.waiting:
            raise RuntimeError(f"batches {sorted(self.waiting)} arrived but batch {self.next_index} never did")
        if self.writer is not None:
            self.writer.close()
            atomic.move_into_place(self.partial, self.path)
        return self.rows


def row_group_refs(path: str | Path) -> Iterator[ray.ObjectRef]:
    """One read task per row group, created lazily as the pool asks for work."""
    for index in range(pq.ParquetFile(path).num_row_groups):
        yield read_row_group.remote(str(path), index)


def stream_parquet(pool: ActorPool, method: str, source: str | Path, target: str | Path, *,
                   max_pending_writes: int = 4, progress=None, **kwargs: Any) -> dict[str, Any]:
    """Run `pool.<method>` over every row group of `source` and write the results to `target`, in order."""
    sink = ray.remote(ParquetSink).options(num_cpus=0.1).remote(str(target))
    writes: deque[ray.ObjectRef] = deque()
    totals = {"batches": 0, "rows": 0, "tokens": 0}
    for index, batch_ref, stats in pool.map(method, row_group_refs(source), **kwargs):
        writes.append(sink.write.remote(index, batch_ref))
        while len(writes) > max_pending_writes:
            ray.get(writes.popleft())
        totals["batches"] += 1
        totals["rows"] += stats["rows"]
        totals["tokens"] += stats["tokens"]
        if progress is not None:
            progress.update(stats["rows"])
    ray.get(list(writes))
    ray.get(sink.close.remote())
    ray.kill(sink)
    return totals
