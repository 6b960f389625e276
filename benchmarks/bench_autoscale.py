"""Autoscaling figures (prints them; not a test): RL jobs submitted with `pear-ray submit` to a cluster that Ray's own
autoscaler sizes (tests/support/autoscaling.py: the fake multi-node provider on loopback, the node types of
cluster/node_types.yaml, CPU only), the rollout pool elastic (num_actors 1, max_actors --max-actors, one `rollout`
node of one CPU per actor) and sized by what the run waits on (resources.rollout.scale.by wait), in two settings
that put the bottleneck on either side:

  generation-bound  long samples (8 prompts x 8 samples of up to --gen-tokens tokens: the untrained student rarely
                    stops early), one update per step
  learner-bound     few short samples (4 prompts x 4 samples of up to 4 tokens), 64 updates per step (GRPO with 4
                    minibatches x 16 epochs)

and the learner-bound one again with scale.by max (the default: room for max_actors for the whole of RL); then the
whole smoke job (score, SFT, RL, eval) with scale.by wait, for the rollout nodes each phase launched and removed. Each
RL job:
the smoke job's RL stage alone, straight from its untrained student (rl.drop_constant_groups false, so every step
trains), max_staleness --staleness (0: the learner waits for each step's whole generation, so the wait share is
generation's share of the step), vLLM rollout actors, the learner (0.5 CPU) on the head.

Figures per RL job: the pool's size and the actors asked for over the steps, the learner's wait share (wait_seconds /
step_seconds, what the rule reads), seconds from a request to the new actor taking work, rollout nodes launched and
removed during RL and after it, and seconds from the end of RL to the last rollout node gone.

Every node of this cluster shares the same two cores, so more rollout actors do not make generation faster here as
they would with a GPU each: the generation-bound run stays generation-bound and grows to max_actors; what is shown is
that the pool follows the wait, not the speed-up.

Run: .venv/bin/python benchmarks/bench_autoscale.py [--help]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from itertools import groupby
from pathlib import Path

from machine_load import MachineLoad, other_load  # benchmarks/ is on sys.path when a benchmark runs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from support.autoscaling import AutoscalingCluster  # noqa: E402  (the tests' harness, importable from the repo)

PEAR_RAY = str(Path(sys.executable).parent / "pear-ray")


def job_overrides(args, setting: str, scale_by: str, out_dir: Path) -> list[str]:
    rollout = (f"{{num_actors: 1, max_actors: {args.max_actors}, num_cpus: 1, resources: {{rollout: 1}}, "
               f"scale: {{by: {scale_by}, window: {args.window}}}}}")
    common = ["stages=[rl]", f"output_dir={out_dir}", "task.num_train=64", f"rl.steps={args.steps}",
              f"rl.max_staleness={args.staleness}", "rl.drop_constant_groups=false", f"rl.checkpoint_every={args.steps}",
              f"resources.rollout={rollout}", "resources.learner={num_ranks: 1, num_cpus: 0.5}"]
    if setting == "generation-bound":
        return common + ["rl.prompts_per_step=8", "rl.group_size=8", f"sampling.max_tokens={args.gen_tokens}"]
    return common + ["rl.prompts_per_step=4", "rl.group_size=4", "sampling.max_tokens=4",
                     "rl.objective.minibatches=4", "rl.objective.epochs_per_batch=16"]


class NodeWatch(threading.Thread):
    """When each rollout node was first seen alive and first seen dead, polled every second."""

    def __init__(self, cluster: AutoscalingCluster):
        super().__init__(daemon=True)
        self.cluster, self.halt = cluster, threading.Event()
        self.up: dict[str, float] = {}
        self.down: dict[str, float] = {}

    def run(self) -> None:
        while not self.halt.wait(1.0):
            now = time.time()
            try:
                nodes = self.cluster.nodes()
            except OSError:  # the dashboard dropped a connection: ask again next second
                continue
            for node in nodes:
                if node.type == "rollout":
                    if node.state == "ALIVE":
                        self.up.setdefault(node.node_id, now)
                    else:
                        self.down.setdefault(node.node_id, now)

    def alive(self) -> int:
        return len(set(self.up) - set(self.down))


def run_job(cluster: AutoscalingCluster, watch: NodeWatch, args, setting: str, scale_by: str) -> dict:
    from pear_ray.tracking import read_metrics

    out_dir = cluster.temp / f"{setting}-{scale_by}"
    started = time.time()
    result = subprocess.run([PEAR_RAY, "submit", "jobs/smoke.yaml", *job_overrides(args, setting, scale_by, out_dir),
                             "--address", cluster.address, "--wait"], cwd=ROOT, env=cluster.client_env(),
                            capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"{setting} ({scale_by}) failed:\n{(result.stdout + result.stderr)[-4000:]}")
    ended = time.time()
    rows = sorted((r for r in read_metrics(out_dir / "smoke") if r["stage"] == "rl"), key=lambda r: r["step"])
    rl_start, rl_end = rows[0]["time"] - rows[0]["step_seconds"], rows[-1]["time"]
    deadline = time.monotonic() + 180
    while watch.alive() and time.monotonic() < deadline:  # the request is withdrawn: the nodes go
        time.sleep(1)
    launched = [node for node, at in watch.up.items() if started <= at <= ended]
    return {
        "rows": rows, "job_seconds": ended - started,
        "launched_during_rl": sum(rl_start - 5 <= watch.up[node] <= rl_end for node in launched),
        "launched_before_rl": sum(watch.up[node] < rl_start - 5 for node in launched),
        "removed_during_rl": sum(rl_start <= watch.down.get(node, 0) <= rl_end for node in launched),
        "removed_after_rl": sum(watch.down.get(node, 0) > rl_end for node in launched),
        "left_up": sum(node not in watch.down for node in launched),
        "last_gone_after_rl_s": max((watch.down[node] - rl_end for node in launched if node in watch.down),
                                    default=float("nan")),
    }


def whole_job(cluster: AutoscalingCluster, watch: NodeWatch, args) -> dict[str, dict[str, int]]:
    """The smoke job's every stage, scale.by wait: rollout nodes launched and removed during each phase (a phase runs
    from its `<key>: starting` log line to the next one; the last, to the job's end), and after the job."""
    out_dir = cluster.temp / "whole-job"
    rollout = (f"{{num_actors: 1, max_actors: {args.max_actors}, num_cpus: 1, resources: {{rollout: 1}}, "
               f"scale: {{by: wait, window: {args.window}}}}}")
    started = time.time()
    result = subprocess.run([PEAR_RAY, "submit", "jobs/smoke.yaml", f"output_dir={out_dir}",
                             f"resources.rollout={rollout}", "--address", cluster.address, "--wait"], cwd=ROOT,
                            env=cluster.client_env(), capture_output=True, text=True, timeout=3600)
    logs = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"the whole job failed:\n{logs[-4000:]}")
    ended = time.time()
    deadline = time.monotonic() + 180
    while watch.alive() and time.monotonic() < deadline:
        time.sleep(1)
    midnight = time.mktime(time.localtime(started)[:3] + (0, 0, 0, 0, 0, -1))

    def logged(pattern: str) -> list[tuple[float, str]]:
        """(time, what the pattern captured) of the driver's log lines that match it."""
        return [(midnight + 3600 * int(h) + 60 * int(m) + int(sec), what)
                for h, m, sec, what in re.findall(rf"^(\d\d):(\d\d):(\d\d) INFO {pattern}", logs, re.M)]

    phases = logged(r"(\S+): starting$")
    bounds = [*phases, (ended, "after the job")]

    def phase_of(at: float) -> str:
        return next(key for (start, key), (end, _) in zip(bounds, bounds[1:] + [(float("inf"), "")])
                    if at < end and (at >= start - 1 or key == phases[0][1]))

    figures = {key: {"launched": 0, "removed": 0} for _, key in bounds}
    for node, at in watch.up.items():
        if at >= started:
            figures[phase_of(at)]["launched"] += 1
            if node in watch.down:
                figures[phase_of(watch.down[node])]["removed"] += 1
    for at, peak in logged(r"\S+: the rollout pool peaked at (\d+) actors"):
        figures[phase_of(at)]["pool_peak"] = int(peak)
    return figures


def runs(values: list) -> str:
    """1 1 1 2 2 3 -> 1x3 2x2 3x1"""
    return " ".join(f"{value:g}x{len(list(group))}" for value, group in groupby(values))


def report(name: str, figures: dict) -> None:
    rows = figures["rows"]
    scale_ups = [r["rollout_scale_up_seconds"] for r in rows if "rollout_scale_up_seconds" in r]
    waits = [r["rollout_wait_share"] for r in rows]
    print(f"\n{name}: {len(rows)} steps, job {figures['job_seconds']:.0f} s, median step "
          f"{statistics.median(r['step_seconds'] for r in rows):.2f} s, samples/step {rows[0]['samples']:g}")
    print(f"  pool size by step (size x steps): {runs([r['rollout_actors'] for r in rows])}")
    print(f"  actors asked for:                 {runs([r['rollout_requested'] for r in rows])}")
    busy = [r["rollout_busy"] for r in rows]
    print(f"  learner wait share by step:       {' '.join(f'{w:.2f}' for w in waits)}")
    print(f"  rollout busy by step:             {' '.join(f'{b:.2f}' for b in busy)}")
    phases = ("wait_seconds", "generate_seconds", "verify_seconds", "train_seconds", "sync_seconds")
    print("  median s per step: " + ", ".join(f"{phase.removesuffix('_seconds')} "
                                              f"{statistics.median(r.get(phase, 0.0) for r in rows):.2f}"
                                              for phase in phases))
    print(f"  request -> new actor taking work: {', '.join(f'{s:.1f}' for s in scale_ups) or '-'} s")
    print(f"  rollout nodes: launched {figures['launched_before_rl']} before RL's first step and "
          f"{figures['launched_during_rl']} during RL; removed {figures['removed_during_rl']} during RL (released) and "
          f"{figures['removed_after_rl']} after it (last one {figures['last_gone_after_rl_s']:.1f} s after RL's last "
          f"step); {figures['left_up']} left up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--max-actors", type=int, default=3)
    parser.add_argument("--window", type=int, default=3, help="resources.rollout.scale.window")
    parser.add_argument("--gen-tokens", type=int, default=256, help="new tokens per sample, generation-bound")
    parser.add_argument("--staleness", type=int, default=0, help="rl.max_staleness")
    parser.add_argument("--parts", default="rl,whole", help="rl (the three RL jobs), whole (the whole smoke job)")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()

    load_before, wall = other_load(), time.perf_counter()
    machine = MachineLoad()
    machine.start()
    results = {}
    # 6 head CPUs (of two real cores): Ray keeps as many idle workers warm, so the verifier tasks of each step find
    # one instead of starting a process (seconds here)
    with AutoscalingCluster(head_cpus=6, max_workers={"rollout": args.max_actors, "learner": 0}) as cluster:
        watch = NodeWatch(cluster)
        watch.start()
        settings = (("generation-bound", "wait"), ("learner-bound", "wait"), ("learner-bound", "max"))
        for setting, scale_by in settings if "rl" in args.parts else ():
            name = f"{setting}, scale.by {scale_by}"
            results[name] = run_job(cluster, watch, args, setting, scale_by)
            report(name, results[name])
        if "whole" in args.parts:
            results["whole job"] = whole_job(cluster, watch, args)
            print("\nthe whole smoke job (score, sft, rl, eval), scale.by wait: rollout nodes launched / removed per "
                  "phase")
            for key, counts in results["whole job"].items():
                print(f"  {key:>16}: launched {counts['launched']}, removed {counts['removed']}"
                      + (f"; the pool grew to {counts['pool_peak']} actors" if "pool_peak" in counts else ""))
        watch.halt.set()
    print(f"\nidle timeout {AutoscalingCluster().idle_timeout_s:.0f} s, autoscaler round 1 s; a rollout node is a raylet "
          f"with 1 CPU on this machine; window {args.window} steps, grow_at/shrink_at 0.5; generate = actor-seconds")
    print(f"total run {time.perf_counter() - wall:.0f} s")
    print(machine.stop())
    print(f"machine before: {load_before}\nmachine after:  {other_load()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
