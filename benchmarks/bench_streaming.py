"""Streaming memory benchmark (prints figures; not a test).

The driver's resident memory while `actors.streaming.stream_parquet(pool, "score", ...)` pushes a Parquet dataset
several times larger than Ray's object store through a pool of vLLM scoring actors and back to Parquet. The rows are
heavy in bytes (a random, incompressible `metadata` text column of --metadata-bytes per row) and light in tokens
(short prompts and responses on the default tiny model), so the run measures the data path, not the model.

- The dataset is written by a separate process (so the driver never holds its bytes), --row-groups row groups.
- Ray is started here with --object-store-mib of object store: `actors.runtime.init_ray` has no object-store
  argument, so this script calls ray.init itself with init_ray's loopback settings and worker environment
  (runtime.LOOPBACK, runtime.worker_env).
- A thread samples the driver's RSS (psutil) every --sample-ms while the stream runs; the figures are RSS at
  start (just before stream_parquet), peak, end, and at the moments 10/50/90% of the batches were done.
- Output rows are checked against input rows (count and id order).

Run: .venv/bin/python benchmarks/bench_streaming.py [--help]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from machine_load import MachineLoad, other_load  # benchmarks/ is on sys.path when a benchmark runs

from pear_ray.data import schema
from pear_ray.models import TinyModelSpec, build_tiny_model

MiB = 2**20


def write_dataset(path: str, row_groups: int, rows_per_group: int, metadata_bytes: int, prompt_len: int,
                  response_len: int, vocab: int) -> None:
    """Run in a child process. Random base64 metadata does not compress, so file size ~ Arrow size."""
    import base64

    rng = np.random.default_rng(0)
    raw = metadata_bytes * 3 // 4  # base64 grows 4/3
    fields = [pa.field(schema.ID, pa.string()), pa.field(schema.PROMPT_IDS, pa.list_(pa.int32())),
              pa.field(schema.RESPONSE_IDS, pa.list_(pa.int32())), pa.field(schema.METADATA, pa.string())]
    with pq.ParquetWriter(path, pa.schema(fields), compression="snappy") as writer:
        for g in range(row_groups):
            first = g * rows_per_group
            blob = rng.bytes(raw * rows_per_group)
            writer.write_table(pa.table({
                schema.ID: [str(first + i) for i in range(rows_per_group)],
                schema.PROMPT_IDS: pa.array(rng.integers(3, vocab, (rows_per_group, prompt_len)).tolist(),
                                            pa.list_(pa.int32())),
                schema.RESPONSE_IDS: pa.array(rng.integers(3, vocab, (rows_per_group, response_len)).tolist(),
                                              pa.list_(pa.int32())),
                schema.METADATA: [base64.b64encode(blob[i * raw:(i + 1) * raw]).decode() for i in
                                  range(rows_per_group)],
            }, schema=pa.schema(fields)), row_group_size=rows_per_group)


class Progress:
    """stream_parquet's progress hook: counts batches done."""

    def __init__(self):
        self.batches = 0
        self.rows = 0

    def update(self, rows: int) -> None:
        self.batches += 1
        self.rows += rows


class RssSampler(threading.Thread):
    def __init__(self, progress: Progress, interval: float):
        super().__init__(daemon=True)
        self.process, self.progress, self.interval = psutil.Process(), progress, interval
        self.samples: list[tuple[float, int, int]] = []  # (seconds, rss bytes, batches done)
        self.halt = threading.Event()

    def run(self) -> None:
        start = time.perf_counter()
        while not self.halt.is_set():
            self.samples.append((time.perf_counter() - start, self.process.memory_info().rss, self.progress.batches))
            self.halt.wait(self.interval)

    def stop(self) -> None:
        self.halt.set()
        self.join()
        self.samples.append((self.samples[-1][0], self.process.memory_info().rss, self.progress.batches))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--object-store-mib", type=int, default=128)
    parser.add_argument("--row-groups", type=int, default=128)
    parser.add_argument("--rows-per-group", type=int, default=128)
    parser.add_argument("--metadata-bytes", type=int, default=48 * 1024, help="metadata text per row")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--response-len", type=int, default=16)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--actor-cpus", type=float, default=1.0, help="Ray CPUs (so torch threads) per actor")
    parser.add_argument("--max-in-flight", type=int, default=2)
    parser.add_argument("--sample-ms", type=float, default=50.0)
    parser.add_argument("--dir", default=None, help="where to write the Parquet files (default: a temp folder)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # inherited by the actors: keeps the table readable

    load_before = other_load()
    machine = MachineLoad()
    machine.start()
    wall = time.perf_counter()
    spec = TinyModelSpec()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        folder = Path(folder)
        model_dir = str(build_tiny_model(spec, folder / "model"))
        source, target = folder / "in.parquet", folder / "out.parquet"
        t0 = time.perf_counter()
        writer = multiprocessing.get_context("spawn").Process(target=write_dataset, args=(
            str(source), args.row_groups, args.rows_per_group, args.metadata_bytes, args.prompt_len,
            args.response_len, spec.vocab_size))
        writer.start()
        writer.join()
        if writer.exitcode:
            raise SystemExit(f"writing the dataset failed (exit code {writer.exitcode})")
        write_s = time.perf_counter() - t0
        meta = pq.ParquetFile(source).metadata
        in_rows = meta.num_rows
        arrow_bytes = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        file_bytes = source.stat().st_size

        import ray

        from pear_ray.actors.roles import rollout_pool
        from pear_ray.actors.streaming import stream_parquet
        from pear_ray.config import RolloutResources
        from pear_ray.runtime import init_ray

        store = args.object_store_mib * MiB
        # +1 CPU: the read tasks and the sink take 0.1 each
        init_ray(num_cpus=args.actors * args.actor_cpus + 1, object_store_memory=store)
        try:
            pool = rollout_pool(model_dir, RolloutResources(num_actors=args.actors, num_cpus=args.actor_cpus,
                                                            max_in_flight=args.max_in_flight), seed=0)
            pool.call_all("health")
            progress = Progress()
            sampler = RssSampler(progress, args.sample_ms / 1000)
            sampler.start()
            t0 = time.perf_counter()
            try:
                totals = stream_parquet(pool, "score", source, target, progress=progress,
                                        column=schema.BEHAVIOR_LOGPROBS)
            finally:
                stream_s = time.perf_counter() - t0
                sampler.stop()
            store_stats = _store_summary()
            time.sleep(2.0)  # Ray frees objects asynchronously once their last reference is dropped
            store_later = _store_summary()
            pool.shutdown()
        finally:
            ray.shutdown()

        out_meta = pq.ParquetFile(target).metadata
        ids_in = pq.read_table(source, columns=[schema.ID]).column(schema.ID)
        ids_out = pq.read_table(target, columns=[schema.ID]).column(schema.ID)
        same_order = ids_in.equals(ids_out)
        out_bytes = target.stat().st_size
        out_columns = pq.ParquetFile(target).schema_arrow.names

    samples = sampler.samples
    rss = np.array([s[1] for s in samples], dtype=np.float64) / MiB
    done = np.array([s[2] for s in samples])
    start, peak, end = rss[0], rss.max(), rss[-1]
    batches = meta.num_row_groups

    def rss_at(fraction: float) -> str:
        reached = np.flatnonzero(done >= int(np.ceil(fraction * batches)))
        return f"{rss[reached[0]]:.0f}" if reached.size else "-"

    growth = peak - start
    flat = growth < max(32.0, 0.1 * start)
    print(f"\nStreaming {batches} row groups through stream_parquet(pool, 'score'): {args.actors} vLLM actor(s) "
          f"({args.actor_cpus:g} CPU each, {args.max_in_flight} in flight), default tiny Qwen2, prompt "
          f"{args.prompt_len} + response {args.response_len} tokens, {args.metadata_bytes // 1024} KiB metadata "
          f"per row; 2-core box")
    print(f"{'dataset':<38} {in_rows} rows, {arrow_bytes / MiB:.0f} MiB in Arrow "
          f"({arrow_bytes / max(meta.num_row_groups, 1) / MiB:.1f} MiB per row group), {file_bytes / MiB:.0f} MiB "
          f"Parquet; written in {write_s:.1f} s by a child process")
    print(f"{'object store':<38} {store / MiB:.0f} MiB (dataset = {arrow_bytes / store:.1f}x the store)")
    print(f"{'stream':<38} {stream_s:.1f} s, {totals['batches']} batches, "
          f"{arrow_bytes / MiB / stream_s:.0f} MiB/s in, {totals['tokens'] / stream_s:.0f} response tokens/s")
    print(f"{'rows in / out':<38} {in_rows} / {out_meta.num_rows} (stream reported {totals['rows']}); ids in "
          f"order: {same_order}; output {out_bytes / MiB:.0f} MiB, columns {out_columns}")
    print(f"{'driver RSS MiB start / peak / end':<38} {start:.0f} / {peak:.0f} / {end:.0f}  (peak growth "
          f"{growth:+.0f} MiB, {100 * growth / start:+.1f}%)")
    print(f"{'driver RSS MiB at 10/50/90% batches':<38} {rss_at(0.1)} / {rss_at(0.5)} / {rss_at(0.9)}  "
          f"({len(samples)} samples every {args.sample_ms:.0f} ms)")
    print(f"{'stayed flat':<38} {'yes' if flat else 'NO'} (peak growth < max(32 MiB, 10% of start))")
    print(f"{'object store right after / 2 s later':<38} {store_stats} / {store_later}")
    print(f"total run {time.perf_counter() - wall:.0f} s")
    print(machine.stop())
    print(f"machine before: {load_before}\nmachine after:  {other_load()}")
    ok = out_meta.num_rows == in_rows == totals["rows"] and same_order
    if not ok:
        raise SystemExit("output rows do not match input rows")


def _store_summary() -> str:
    """Ray's aggregate object store line(s), including what was spilled to disk, if anything."""
    try:
        from ray._private.internal_api import memory_summary

        lines = memory_summary(stats_only=True).splitlines()
    except Exception as error:  # private API: report rather than fail
        return f"(memory_summary unavailable: {type(error).__name__})"
    keep = [line.strip() for line in lines if line.strip() and not line.startswith("---")]
    if not any("pilled" in line for line in keep):
        keep.append("nothing spilled")
    return "; ".join(keep)


if __name__ == "__main__":
    main()
