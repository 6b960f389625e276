"""Task-worker churn in the RL stage (prints figures; not a test): how many Ray worker processes a 30-step RL run
starts, and its step times, with Ray's default of idle workers kept (one per CPU) and with pear_ray's
(runtime.IDLE_TASK_WORKERS).

RL's scoring, cut and verifier tasks need a few workers at once. When Ray keeps fewer idle workers than that, it ends
the rest after a second idle and starts them again a step later, and each start imports torch and transformers: on a
2-core box seconds of a core, more under load. Counted from this process's own descendants, so other Ray instances
on the machine do not count. The same tiny model and reward as the RL tests (tests/support/rl.py), transformers
rollout backend, max_staleness 1; each setting in a fresh process with its own Ray instance.

Run: .venv/bin/python benchmarks/bench_task_workers.py [--steps 30] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from machine_load import MachineLoad, other_load  # benchmarks/ is on sys.path when a benchmark runs

ROOT = Path(__file__).resolve().parents[1]


def one_run(steps: int, kept: int | None, folder: Path) -> dict:
    """In this process: RL for `steps` steps in a fresh Ray instance keeping `kept` idle workers (None: Ray's
    default); the workers started meanwhile and the step times."""
    sys.path.insert(0, str(ROOT / "tests"))
    from support.rl import run_rl

    from pear_ray import runtime
    from pear_ray.models import TinyModelSpec, build_tiny_model

    if kept is None:  # Ray's own default: one idle worker per CPU
        runtime.IDLE_TASK_WORKERS = 0
    model = build_tiny_model(TinyModelSpec(), folder / "model")
    runtime.init_ray(num_cpus=2)
    started, seen, stop = time.time(), {}, threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for process in psutil.Process().children(recursive=True):
                try:
                    if "default_worker.py" in " ".join(process.cmdline()):
                        seen[process.pid] = process.create_time()
                except psutil.Error:
                    pass
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    rows, _ = run_rl(folder / "run", model, steps=steps, max_staleness=1, drop_constant_groups=False,
                     save_rollouts=False, rollout={"engine": {"backend": "transformers"}})
    stop.set()
    return {"workers_started": sum(1 for at in seen.values() if at >= started - 1),
            "step_seconds": [row["step_seconds"] for row in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one run, "default" or "pear_ray"
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as folder:
            result = one_run(args.steps, None if args.one == "default" else 8, Path(folder))
        print("RESULT " + json.dumps(result))
        return

    load_before, machine = other_load(), MachineLoad()
    machine.start()
    print(f"RL, {args.steps} steps, transformers x1, k=1, tiny Qwen2: worker processes started and step seconds "
          "(step 1, which starts the actors, left out)")
    print(f"{'idle workers kept':>24} {'round':>5} {'workers started':>15} {'steps 2.. total s':>17} {'max step s':>10}")
    for round_ in range(args.rounds):
        for setting in ("default", "pear_ray"):
            out = subprocess.run([sys.executable, __file__, "--one", setting, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True).stdout
            result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            later = result["step_seconds"][1:]
            name = "Ray's default (1/CPU)" if setting == "default" else "pear_ray (8)"
            print(f"{name:>24} {round_ + 1:5d} {result['workers_started']:15d} {sum(later):17.2f} {max(later):10.2f}")
    print(machine.stop())
    print(f"machine before: {load_before}\nmachine after:  {other_load()}")


if __name__ == "__main__":
    main()
