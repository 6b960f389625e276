"""Run folders on object storage: what a checkpoint uploads, and what resuming from the bucket on a fresh machine
costs (prints figures; not a test).

The store is moto's S3 server on loopback (the tests' store), so the seconds are those of this machine's disk, CPU
and loopback, not of a cloud's network: read them as pear_ray's own overhead. Bytes are what S3 would store.

  checkpoint   a 1-rank ZeRO-2 learner on each student (the smoke job's tiny model and the demo's) takes one SFT step
               (so AdamW has its moments), then checkpoints into a local folder and into s3://: files and bytes
               uploaded per checkpoint (every object under its tag, plus `latest`), and seconds for each.
  resume       the smoke job (score and SFT, a checkpoint after every SFT step) killed while writing its second SFT
               checkpoint, then run again: from the bucket on an empty scratch folder (a fresh machine), and, for
               comparison, the same kill and rerun in a local folder. Seconds of the whole rerun, and until it logs
               "resuming at step"; and, in this process, seconds and bytes to fetch what that resume reads (state,
               metrics, the SFT data, the checkpoint) into another empty scratch.

Run: .venv/bin/python benchmarks/bench_storage.py [--help]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_load import MachineLoad, free_port, other_load  # benchmarks/ is on sys.path when a benchmark runs

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "bench"
SMOKE = [str(ROOT / "jobs" / "smoke.yaml"), "task.num_train=16", "task.num_eval=4", "score.teacher_sft_steps=20",
         "score.samples_per_prompt=2", "sft.batch_size=8", "stages=[score,sft]", "sft.checkpoint_every=1"]
KILL_AT = "checkpoint-write/sft-token:2"
STUDENTS = {  # the students' specs as the jobs give them
    "smoke": {"seed": 1},
    "demo": {"seed": 1, "hidden_size": 128, "num_heads": 4, "num_kv_heads": 4, "intermediate_size": 512},
}


def start_store(folder: Path) -> subprocess.Popen:
    """moto's S3 server on a free loopback port, this process pointed at it (the standard variables), the bucket
    made."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_EC2_METADATA_DISABLED="true",
                      PEAR_RAY_SCRATCH=str(folder / "scratch"))
    from pyarrow import fs

    fs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir(BUCKET)
    return server


def bucket_bytes(prefix: str) -> tuple[int, int]:
    """(objects, bytes) under bucket/prefix."""
    from pear_ray.storage import RunFolder

    sizes = RunFolder(f"s3://{BUCKET}/{prefix}").sizes()
    return len(sizes), sum(sizes.values())


def checkpoint_sizes(folder: Path) -> list[str]:
    """The table of what a checkpoint of each student uploads, and how long a save takes locally and into s3://."""
    import numpy as np
    import pyarrow as pa
    import ray
    from safetensors import safe_open

    from pear_ray.actors.learner import LearnerGroup
    from pear_ray.config import LearnerResources
    from pear_ray.data import schema
    from pear_ray.models import TinyModelSpec, build_tiny_model
    from pear_ray.objectives import PearSft
    from pear_ray.runtime import init_ray

    init_ray(num_cpus=2)
    lines = [f"{'student':8} {'parameters':>10} {'files':>5} {'bytes uploaded':>15} {'local s':>8} {'s3 s':>6}"]
    rng = np.random.default_rng(0)
    rows = 8
    batch = schema.conform(pa.table({schema.PROMPT_IDS: rng.integers(3, 300, (rows, 8)).tolist(),
                                     schema.RESPONSE_IDS: rng.integers(3, 300, (rows, 8)).tolist(),
                                     schema.BEHAVIOR_LOGPROBS: rng.uniform(-3, -1, (rows, 8)).tolist()}))
    for name, spec in STUDENTS.items():
        model = build_tiny_model(TinyModelSpec(**spec), folder / "models" / name)
        with safe_open(str(model / "model.safetensors"), "np") as weights:
            parameters = sum(weights.get_tensor(key).size for key in weights.keys())
        group = LearnerGroup(model, LearnerResources(num_ranks=1, zero_stage=2, num_cpus=1), lr=1e-4, total_steps=10)
        try:
            group.step(ray.put(batch), PearSft(level="token"))
            started = time.perf_counter()
            group.save_checkpoint(folder / "local" / name)
            local_seconds = time.perf_counter() - started
            started = time.perf_counter()
            tag = group.save_checkpoint(f"s3://{BUCKET}/checkpoints/{name}")
            s3_seconds = time.perf_counter() - started
        finally:
            group.shutdown()
        files, size = bucket_bytes(f"checkpoints/{name}/{tag}")
        files, size = files + 1, size + len(tag)  # and `latest`
        lines.append(f"{name:8} {parameters:>10,} {files:>5} {size:>15,} {local_seconds:>8.2f} {s3_seconds:>6.2f}")
    ray.shutdown()
    return lines


def run_cli(scratch: Path, run_dir: str, *, kill: bool) -> tuple[float, float | None]:
    """`pear-ray run` of the smoke job into run_dir, killed at KILL_AT or to the end; (seconds, seconds until it
    said "resuming at step", if it did)."""
    env = {**os.environ, "PEAR_RAY_SCRATCH": str(scratch), "PYTHONPATH": str(ROOT)}
    if kill:
        env["PEAR_RAY_KILL_AT"] = KILL_AT
    started, resumed_at = time.perf_counter(), None
    process = subprocess.Popen([str(Path(sys.executable).parent / "pear-ray"), "run", *SMOKE, "--run-dir", run_dir],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               env=env)
    try:
        for line in process.stdout:
            if "resuming at step" in line and resumed_at is None:
                resumed_at = time.perf_counter() - started
        process.wait()
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # what the run left (a killed run's Ray processes)
        except ProcessLookupError:
            pass
    expected = -signal.SIGKILL if kill else 0
    if process.returncode != expected:
        raise SystemExit(f"pear-ray run into {run_dir} ended with {process.returncode}, not {expected}")
    return time.perf_counter() - started, resumed_at


def fetch_seconds(folder: Path) -> tuple[float, int]:
    """Seconds and bytes to fetch what a resume of s3://bench/resume reads into an empty scratch, in this process."""
    from pear_ray.driver.run import NOT_PUBLISHED, STATE_FILE
    from pear_ray.engines.checkpoints import usable_tag
    from pear_ray.storage import RunFolder
    from pear_ray.tracking.metrics import RESUMED_FILES

    os.environ["PEAR_RAY_SCRATCH"] = str(folder / "fetch-scratch")
    started = time.perf_counter()
    run = RunFolder(f"s3://{BUCKET}/resume", skip=NOT_PUBLISHED)
    run.prepare(STATE_FILE, RESUMED_FILES)
    run.fetch(run.local / "data" / "sft.parquet")
    checkpoints = RunFolder(run.where(run.local / "checkpoints" / "sft-token"))
    checkpoints.fetch(checkpoints.local / usable_tag(checkpoints))
    seconds = time.perf_counter() - started
    return seconds, sum(path.stat().st_size for path in run.local.rglob("*") if path.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args()
    before = other_load()
    load = MachineLoad()
    load.start()
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        folder = Path(tmp)
        server = start_store(folder)
        try:
            lines = ["## bytes uploaded per checkpoint (1 rank, ZeRO-2, fp32, after one AdamW step)",
                     *checkpoint_sizes(folder), ""]
            seconds = {}
            for where, run_dir, first, second in (
                    ("bucket, fresh scratch", f"s3://{BUCKET}/resume", "machine-1", "machine-2"),
                    ("local folder, in place", str(folder / "local-run"), "machine-1", "machine-1")):
                run_cli(folder / first, run_dir, kill=True)
                seconds[where] = run_cli(folder / second, run_dir, kill=False)
            lines += ["## resuming the smoke job killed while writing its second SFT checkpoint (score done)",
                      f"{'rerun':25} {'whole rerun s':>13} {'until resuming s':>16}"]
            lines += [f"{where:25} {total:>13.1f} {until:>16.1f}" for where, (total, until) in seconds.items()]
            fetched, size = fetch_seconds(folder)
            lines += [f"what that resume fetches (state, metrics, SFT data, checkpoint step1): {size:,} bytes in "
                      f"{fetched:.2f} s"]
        finally:
            server.terminate()
            server.wait()
    print("\n".join(lines))
    print(load.stop())
    print(f"machine before: {before}")
    print(f"machine after:  {other_load()}")


if __name__ == "__main__":
    main()
