"""Driver memory benchmark for SFT data several times larger than the object store (prints figures; not a test).

The SFT stage (`stages.sft.run_sft`, in this process, so this process is the Ray driver) trains the default tiny
model on a synthetic scored SFT file of about --store-multiple x the object store: random token ids and behaviour
log-probs, and a random, incompressible `metadata` text column of --metadata-kib per row, so the rows are heavy in
bytes and light in tokens (the run measures the data path, not the model). The learner ranks stream their shards
through Ray Data; the run reads the whole file --epochs times. The file is written by a child process, so the
driver never holds its bytes.

bench_long_run.py's sampler takes, every --sample-s, the resident memory of the driver and of every Ray worker
process by what it runs (`LearnerRank`, the Ray Data read tasks' workers, Ray's daemons), and the object store's
used bytes; printed per process type: start (once the first step is done), peak and end. RSS counts the object
store pages a process has touched. `--whole-file-object` then does what the stage did before Ray Data: one task
reads the whole file into one object, and the object store's figures say where that object went.

Run: .venv/bin/python benchmarks/bench_driver_memory.py [--help]
"""

from __future__ import annotations

import argparse
import base64
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from bench_long_run import Sampler, object_store_stats, steps_done, summary
from machine_load import MachineLoad, other_load  # benchmarks/ is on sys.path when a benchmark runs

from pear_ray.config import load_job
from pear_ray.data import schema
from pear_ray.models import TinyModelSpec, build_tiny_model
from pear_ray.runtime import init_ray
from pear_ray.stages.common import Run
from pear_ray.stages.sft import run_sft
from pear_ray.tracking import MetricsLogger

MiB = 2**20
SMOKE = Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml"
ROWS_PER_GROUP = 64  # as the score stage writes (score.batch_size)


def write_scored_data(path: str, rows: int, metadata_bytes: int, prompt_len: int, response_len: int,
                      vocab: int) -> None:
    """Run in a child process: scored SFT rows in row groups of ROWS_PER_GROUP."""
    rng = np.random.default_rng(0)
    raw = metadata_bytes * 3 // 4  # base64 grows 4/3
    with pq.ParquetWriter(path, schema.conform(write_group(rng, 0, 1, raw, prompt_len, response_len, vocab)).schema,
                          compression="snappy") as writer:
        for first in range(0, rows, ROWS_PER_GROUP):
            n = min(ROWS_PER_GROUP, rows - first)
            writer.write_table(schema.conform(write_group(rng, first, n, raw, prompt_len, response_len, vocab)))


def write_group(rng, first: int, n: int, raw: int, prompt_len: int, response_len: int, vocab: int) -> pa.Table:
    blob = rng.bytes(raw * n)
    return pa.table({
        schema.ID: [str(first + i) for i in range(n)],
        schema.PROMPT_IDS: rng.integers(3, vocab, (n, prompt_len)).tolist(),
        schema.RESPONSE_IDS: rng.integers(3, vocab, (n, response_len)).tolist(),
        schema.BEHAVIOR_LOGPROBS: rng.uniform(-7.5, -4.5, (n, response_len)).tolist(),
        schema.METADATA: [base64.b64encode(blob[i * raw:(i + 1) * raw]).decode() for i in range(n)],
    })


def store_line(label: str) -> str:
    stats = object_store_stats()
    return (f"{label:38s} used {stats.object_store_bytes_used / MiB:.0f} MiB, {stats.num_local_objects} objects, "
            f"spilled {stats.spilled_bytes_total / MiB:.0f} MiB in total, fallback (disk-backed) "
            f"{stats.object_store_bytes_fallback / MiB:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--object-store-mib", type=int, default=80)
    parser.add_argument("--store-multiple", type=float, default=4.0, help="data size in Arrow / object store")
    parser.add_argument("--metadata-kib", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--response-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128, help="sft.batch_size")
    parser.add_argument("--epochs", type=int, default=1, help="sft.epochs")
    parser.add_argument("--ranks", type=int, default=1, help="resources.learner.num_ranks")
    parser.add_argument("--sample-s", type=float, default=1.0, help="seconds between memory samples")
    parser.add_argument("--whole-file-object", action="store_true",
                        help="then read the whole file into one object, as the stage did before Ray Data")
    args = parser.parse_args()

    spec = TinyModelSpec()
    row_bytes = args.metadata_kib * 1024 + 4 * args.prompt_len + 8 * args.response_len + 32
    rows = int(args.store_multiple * args.object_store_mib * MiB / row_bytes)
    overrides = [f"sft.batch_size={args.batch_size}", f"sft.epochs={args.epochs}", "sft.checkpoint_every=100000",
                 f"resources.learner.num_ranks={args.ranks}", "resources.learner.num_cpus=0.5", "loggers=[]"]
    job = load_job(SMOKE, overrides)
    load_before = other_load()
    with tempfile.TemporaryDirectory(prefix="bench-driver-memory-") as folder:
        folder = Path(folder)
        data = folder / "sft.parquet"
        writer = multiprocessing.get_context("spawn").Process(target=write_scored_data, args=(
            str(data), rows, args.metadata_kib * 1024, args.prompt_len, args.response_len, spec.vocab_size))
        writer.start()
        writer.join()
        if writer.exitcode:
            raise SystemExit(f"writing the dataset failed (exit code {writer.exitcode})")
        meta = pq.ParquetFile(data).metadata
        arrow_bytes = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        student = build_tiny_model(spec, folder / "student")
        run_dir = folder / "run"
        run = Run(job, run_dir, MetricsLogger(run_dir, resume=False, loggers=()), student)

        init_ray(num_cpus=2, object_store_memory=args.object_store_mib * MiB)
        sampler, load = Sampler(run_dir, args.sample_s, stage="sft"), MachineLoad()
        load.start()
        sampler.start()
        started = time.perf_counter()
        run_sft(run, "token", data)
        seconds = time.perf_counter() - started
        sampler.halt.set()
        sampler.join()
        cpu = load.stop()
        done = steps_done(run_dir, "sft")
        after_sft = store_line("object store after SFT")
        whole = None
        if args.whole_file_object:
            whole = whole_file_object(data)

    print(f"SFT data path: {done} steps of sft.batch_size {args.batch_size} over {args.ranks} learner rank(s), "
          f"{args.epochs} epoch(s), default tiny model, in {seconds:.0f} s; {len(sampler.samples)} samples every "
          f"{args.sample_s:g} s")
    print(f"{'dataset':38s} {meta.num_rows} rows, {arrow_bytes / MiB:.0f} MiB in Arrow in {meta.num_row_groups} row "
          f"groups of {ROWS_PER_GROUP}, {data_size(meta) / MiB:.0f} MiB Parquet (prompt {args.prompt_len} + "
          f"response {args.response_len} tokens, {args.metadata_kib} KiB metadata per row)")
    print(f"{'object store':38s} {args.object_store_mib} MiB (dataset = {arrow_bytes / MiB / args.object_store_mib:.1f}x "
          f"the store)")
    print(f"machine before: {load_before}\nmachine after:  {other_load()}\n{cpu}")
    print(f"{'process type':24s} {'start MiB':>10s} {'peak MiB':>10s} {'end MiB':>10s}")
    for kind, start, peak, end, _ in summary(sampler.samples, done):
        print(f"{kind:24s} {start:10.1f} {peak:10.1f} {end:10.1f}")
    print(after_sft)
    if whole is not None:
        print(whole)
    ray.shutdown()


def data_size(meta) -> int:
    return sum(meta.row_group(i).column(c).total_compressed_size for i in range(meta.num_row_groups)
               for c in range(meta.num_columns))


def whole_file_object(path: Path) -> str:
    """What the stage did before Ray Data: one task reads the whole file into one object (the driver holds only its
    ref), and a second task reads the object's row count (its error, if the object could not be made)."""
    read = ray.remote(num_cpus=0.1)(pq.read_table)
    count = ray.remote(num_cpus=0.1)(lambda table: table.num_rows)
    started = time.perf_counter()
    whole = read.remote(str(path))
    try:
        rows = ray.get(count.remote(whole))
        outcome = f"made in {time.perf_counter() - started:.0f} s, {rows} rows"
    except Exception as error:  # noqa: BLE001 - what happens is the figure
        outcome = f"failed after {time.perf_counter() - started:.0f} s: {type(error).__name__}: {str(error)[:300]}"
    return store_line(f"whole file as one object ({outcome}):\n")


if __name__ == "__main__":
    main()
