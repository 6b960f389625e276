"""RL throughput benchmark (prints figures; not a test): the RL stage itself (`stages.rl.run_rl`) at
rl.max_staleness 0, 1, 2 with 1 and 2 rollout actors of each rollout backend (vLLM, transformers), and the seconds
per phase the stage logs.

Settings, as jobs/smoke.yaml on this 2-core box: the default tiny Qwen2 (pear_ray.models.TinyModelSpec, fp32),
reasoning-gym basic_arithmetic (2 one-digit terms), --prompts train prompts, --prompts-per-step prompts x
--group-size samples per step, at most --max-tokens new tokens, temperature 1; GRPO with one update per step, clip
0.2/0.28, token-mean, TIS cap 2, no KL; every group trained (rl.drop_constant_groups false: a tiny random model
solves nothing, so every group would be dropped and nothing trained); each rollout actor and the learner (1 rank,
ZeRO-2) 0.5 Ray CPU. No checkpoint inside the run (one would drain the pipeline). Each of --rounds rounds runs
every setting once, starting one setting later each round, so that load from other processes hits them alike.
Figures are medians over the steps after --warmup of every round; samples/s = samples per step / median step
seconds.

Run: .venv/bin/python benchmarks/bench_rl.py [--help]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from machine_load import MachineLoad, add_grpo_workload, other_load  # benchmarks/ is on sys.path when a benchmark runs

PHASES = ("wait_seconds", "generate_seconds", "verify_seconds", "train_seconds", "sync_seconds", "step_seconds")


def job_tree(model: str, args, backend: str, actors: int, staleness: int) -> dict:
    return {
        "name": "bench-rl", "seed": 0, "loggers": [], "models": {"student": {"path": model}},
        "task": {"kind": "reasoning_gym", "name": "basic_arithmetic", "num_train": args.prompts, "num_eval": 2,
                 "args": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}},
        "sampling": {"temperature": 1.0, "max_tokens": args.max_tokens},
        "rl": {"steps": args.warmup + args.steps, "prompts_per_step": args.prompts_per_step,
               "group_size": args.group_size, "lr": 1e-5, "drop_constant_groups": False,
               "checkpoint_every": args.warmup + args.steps + 1, "max_staleness": staleness},
        "resources": {"rollout": {"num_actors": actors, "num_cpus": 0.5, "engine": {"backend": backend}},
                      "learner": {"num_ranks": 1, "num_cpus": 0.5, "zero_stage": 2}},
    }


def run_once(model: str, args, setting: tuple[str, int, int], folder: Path, round_: int) -> list[dict]:
    from pear_ray.config import parse_job
    from pear_ray.stages.common import Run
    from pear_ray.stages.rl import run_rl
    from pear_ray.tracking import MetricsLogger, read_metrics

    backend, actors, staleness = setting
    job = parse_job(job_tree(model, args, backend, actors, staleness))
    run_dir = folder / f"{backend}-x{actors}-k{staleness}-r{round_}"
    with MetricsLogger(run_dir, resume=False, loggers=()) as metrics:
        run_rl(Run(job, run_dir, metrics, Path(model)), "none", Path(model))
    rows = sorted((r for r in read_metrics(run_dir) if r["stage"] == "rl"), key=lambda r: r["step"])
    return rows[args.warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_grpo_workload(parser)
    parser.add_argument("--backends", default="vllm,transformers", help="rollout backends (resources.rollout.engine.backend)")
    parser.add_argument("--actors", default="1,2")
    parser.add_argument("--staleness", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="also write the per-setting medians here")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    import ray

    from pear_ray.models import TinyModelSpec, build_tiny_model
    from pear_ray.runtime import init_ray

    load_before = other_load()
    machine = MachineLoad()
    machine.start()
    wall = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        model = str(build_tiny_model(TinyModelSpec(), Path(folder) / "model"))
        init_ray(num_cpus=4)
        try:
            settings = [(b, int(a), int(k)) for b in args.backends.split(",") for a in args.actors.split(",")
                        for k in args.staleness.split(",")]
            rows = {setting: [] for setting in settings}
            for round_ in range(args.rounds):
                for setting in settings[round_ % len(settings):] + settings[:round_ % len(settings)]:
                    rows[setting] += run_once(model, args, setting, Path(folder), round_)
            for (backend, actors, staleness), timed in rows.items():
                med = {key: statistics.median(r.get(key, 0.0) for r in timed)
                       for key in (*PHASES, "samples", "rollout_busy", "learner_busy", "staleness_mean")}
                med["samples_per_s"] = med["samples"] / med["step_seconds"]
                results[f"{backend} {actors} actor(s), k={staleness}"] = med
        finally:
            ray.shutdown()

    print(f"\nRL stage throughput, tiny Qwen2 {TinyModelSpec()}: basic_arithmetic, {args.prompts_per_step} prompts x "
          f"{args.group_size} samples, <= {args.max_tokens} tokens, temperature 1, GRPO 1 update/step, clip 0.2/0.28, "
          f"token-mean, no KL; rollout actors and learner at 0.5 CPU each; median of {args.rounds} rounds x "
          f"{args.steps} steps after {args.warmup} warm-up")
    print(f"{'setting':>32} {'samples/s':>9} {'step s':>7} {'wait s':>7} {'gen s':>7} {'verify s':>8} {'train s':>7} "
          f"{'sync s':>7} {'rollout busy':>12} {'learner busy':>12} {'staleness':>9}")
    base = {name.split(",")[0]: m["samples_per_s"] for name, m in results.items() if name.endswith("k=0")}
    for name, m in results.items():
        speedup = m["samples_per_s"] / base[name.split(",")[0]]
        print(f"{name:>32} {m['samples_per_s']:9.1f} {m['step_seconds']:7.3f} {m['wait_seconds']:7.3f} "
              f"{m['generate_seconds']:7.3f} {m['verify_seconds']:8.3f} {m['train_seconds']:7.3f} "
              f"{m['sync_seconds']:7.3f} {m['rollout_busy']:12.2f} {m['learner_busy']:12.2f} "
              f"{m['staleness_mean']:9.2f}  x{speedup:.2f} vs k=0")
    print("wait = driver waiting for the step's batch; gen = actor-seconds generating it; verify = decode, verifier "
          "tasks, advantages (what is left once generated); train = learner.step; sync = weights to the actors (at "
          "k >= 1 it waits for the generation in flight ahead of the update)")
    print(f"total run {time.perf_counter() - wall:.0f} s")
    print(machine.stop())
    print(f"machine before: {load_before}\nmachine after:  {other_load()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
