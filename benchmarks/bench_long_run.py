"""Long-run memory benchmark (prints figures; not a test).

A long RL stage (hundreds of steps, GRPO on the smoke job's tiny models, straight from the built student) run by
`pear_ray.driver.run.run_job` in this process, so this process is the Ray driver. A thread samples, every
--sample-s, the resident memory of the driver and of every Ray worker process by the actor class it runs (its
process title, `ray::RolloutActor...`), and the object store's used bytes and object count (what `ray memory
--stats-only` reports). Printed per process type: RSS at the first sample after RL's first step, peak, end, and the slope over
the second half of the steps (MiB per 100 steps; flat memory is a slope near 0), and the same for the object store.

Run: .venv/bin/python benchmarks/bench_long_run.py [--steps 300] [--help]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil
import ray
from machine_load import MachineLoad, other_load  # benchmarks/ is on sys.path when a benchmark runs

from pear_ray.config import load_job
from pear_ray.driver.run import run_job

MiB = 2**20
SMOKE = Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml"
DRIVER = "driver"
OBJECT_STORE = "object store (used MiB)"
OBJECT_COUNT = "object store (objects)"


def object_store_stats():
    """The object store's aggregate stats (what `ray memory --stats-only` prints), from Ray's internal API."""
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    return get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address)).store_stats


def process_type(process: psutil.Process) -> str | None:
    """A Ray worker's actor class from its process title (`ray::RolloutActor.generate` -> RolloutActor); `ray::IDLE`
    and task workers as themselves; Ray's own daemons (raylet, gcs_server, ...) by name."""
    try:
        title = " ".join(process.cmdline())
    except psutil.Error:
        return None
    if title.startswith("ray::"):
        return title.removeprefix("ray::").split(".")[0].split()[0] or None
    return process.name() or None


def steps_done(run_dir: Path, stage: str = "rl") -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line and json.loads(line).get("stage") == stage)


class Sampler(threading.Thread):
    """RSS per process type and the object store's used bytes, with the `stage` step reached, every `interval` s."""

    def __init__(self, run_dir: Path, interval: float, stage: str = "rl"):
        super().__init__(daemon=True)
        self.run_dir, self.interval, self.stage, self.halt = run_dir, interval, stage, threading.Event()
        self.samples: list[tuple[int, dict[str, float]]] = []  # (step, {type: MiB})

    def run(self) -> None:
        me = psutil.Process()
        while not self.halt.wait(self.interval):
            sizes: dict[str, float] = defaultdict(float)
            sizes[DRIVER] = me.memory_info().rss / MiB
            for child in me.children(recursive=True):
                kind = process_type(child)
                try:
                    if kind:
                        sizes[kind] += child.memory_info().rss / MiB
                except psutil.Error:
                    continue
            if ray.is_initialized():
                stats = object_store_stats()
                sizes[OBJECT_STORE], sizes[OBJECT_COUNT] = stats.object_store_bytes_used / MiB, stats.num_local_objects
            self.samples.append((steps_done(self.run_dir, self.stage), dict(sizes)))


def summary(samples: list[tuple[int, dict[str, float]]], steps: int) -> list[tuple[str, float, float, float, float]]:
    """Per type: (type, start, peak, end, slope MiB/100 steps over the second half), from the samples taken once
    the stage's first step was done."""
    during = [(step, sizes) for step, sizes in samples if 1 <= step]
    kinds = sorted({kind for _, sizes in during for kind in sizes})
    rows = []
    for kind in kinds:
        series = [(step, sizes[kind]) for step, sizes in during if kind in sizes]
        if len(series) < 2:
            continue
        values = np.array([v for _, v in series])
        late = [(s, v) for s, v in series if s >= steps // 2]
        slope = float(np.polyfit([s for s, _ in late], [v for _, v in late], 1)[0] * 100) if len(
            {s for s, _ in late}) > 1 else float("nan")
        rows.append((kind, values[0], values.max(), values[-1], slope))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="RL steps")
    parser.add_argument("--sample-s", type=float, default=1.0, help="seconds between memory samples")
    args = parser.parse_args()

    overrides = ["stages=[rl]", f"rl.steps={args.steps}", "rl.prompts_per_step=4", "rl.group_size=4",
                 "rl.checkpoint_every=50", "loggers=[]"]
    job = load_job(SMOKE, overrides)
    load_before = other_load()
    with tempfile.TemporaryDirectory(prefix="bench-long-run-") as folder:
        run_dir = Path(folder) / "run"
        sampler, load = Sampler(run_dir, args.sample_s), MachineLoad()
        load.start()
        sampler.start()
        started = time.perf_counter()
        run_job(job, run_dir)
        seconds = time.perf_counter() - started
        sampler.halt.set()
        sampler.join()
        cpu = load.stop()
        done = steps_done(run_dir)

    print(f"long RL run: {done} steps of GRPO (smoke job's tiny models; {' '.join(overrides)}) in {seconds:.0f} s, "
          f"{len(sampler.samples)} samples every {args.sample_s:g} s")
    print(f"machine before: {load_before}\nmachine after:  {other_load()}\n{cpu}")
    print(f"{'process type':24s} {'start MiB':>10s} {'peak MiB':>10s} {'end MiB':>10s} {'MiB/100 steps (2nd half)':>26s}")
    for kind, start, peak, end, slope in summary(sampler.samples, done):
        print(f"{kind:24s} {start:10.1f} {peak:10.1f} {end:10.1f} {slope:26.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
