"""Picking rows out of a Parquet file by index, for training data that streams instead of being read whole.

Pure pyarrow and numpy (no Ray): the Ray Data pipeline that calls these is in `pear_ray/actors/data_stream.py`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def read_rows(path: str | Path, rows: np.ndarray) -> pa.Table:
    """Rows of a Parquet file in the order given, reading only the row groups they fall in, one at a time, so
    memory holds one row group besides the rows taken."""
    rows = np.asarray(rows, dtype=np.int64)
    file = pq.ParquetFile(path)
    starts = np.cumsum([0] + [file.metadata.row_group(group).num_rows for group in range(file.num_row_groups)])
    if rows.size and (rows.min() < 0 or rows.max() >= starts[-1]):
        raise IndexError(f"{path}: rows {rows.min()}..{rows.max()} asked of a file of {starts[-1]} rows")
    groups = np.searchsorted(starts, rows, side="right") - 1
    pieces, positions = [file.schema_arrow.empty_table()], [np.empty(0, np.int64)]
    for group in np.unique(groups):
        picked = np.flatnonzero(groups == group)
        pieces.append(file.read_row_group(int(group)).take(rows[picked] - starts[group]))
        positions.append(picked)
    # Piece by piece, the taken rows follow the row groups; put them back in the order asked for.
    return pa.concat_tables(pieces).take(np.argsort(np.concatenate(positions), kind="stable"))


def regroup(tables: Iterable[pa.Table], counts: Iterable[int]) -> Iterator[pa.Table]:
    """The rows of `tables`, in order, cut into consecutive tables of `counts` rows (however the rows arrived
    blocked)."""
    tables = iter(tables)
    pending: list[pa.Table] = []
    held = 0
    for count in counts:
        while held < count:
            table = next(tables, None)
            if table is None:
                raise ValueError(f"the stream ended {count - held} row(s) short of a group of {count}")
            pending.append(table)
            held += table.num_rows
        joined = pa.concat_tables(pending)
        yield joined.slice(0, count)
        pending, held = [joined.slice(count)], held - count
