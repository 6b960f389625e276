"""RL throughput benchmark (prints figures; not a test): pear_ray's RL stage at rl.max_staleness 0, 1, 2 with 1 and
2 rollout actors of each rollout backend (vLLM, transformers), and the seconds per phase the stage logs.

Each setting runs the way a user runs a job: a job file (stages [rl]) run by `pear-ray run JOB --run-dir DIR` in a
subprocess, with the CLI's default console mode (the workers' output to files in DIR/logs) and the job's default
loggers (tensorboard); the per-step figures are read back from DIR/metrics.jsonl. With --in-process, the same jobs
also run as the stage alone in this process (`stages.rl.run_rl`, Ray started without a log folder, no loggers), as
this benchmark used to: a gap between the two rows of a setting is a cost of the user's path that the stage alone
does not pay (an actor that ran two torch threads only in the log-to-files mode, once).

Settings, as jobs/smoke.yaml on this 2-core box: the default tiny Qwen2 (pear_ray.models.TinyModelSpec, fp32),
reasoning-gym basic_arithmetic (2 one-digit terms), --prompts train prompts, --prompts-per-step prompts x
--group-size samples per step, at most --max-tokens new tokens, temperature 1; GRPO with one update per step, clip
0.2/0.28, token-mean, TIS cap 2, no KL; every group trained (rl.drop_constant_groups false: a tiny random model
rarely solves a prompt, so most groups would be dropped); each rollout actor and the learner (1 rank, ZeRO-2) 0.5
Ray CPU. No checkpoint inside the run (one would drain the pipeline). Each of --rounds rounds runs every setting
once, starting one setting later each round, so that load from other processes hits them alike. Per round:
samples/s = samples per step / median step seconds over the steps after --warmup; the table gives the median and
the spread (min-max) of that over rounds, and the phases' medians over every timed step. The warm-up is long (15
steps) because every `pear-ray run` starts a fresh Ray instance, whose task workers (scoring, verifiers) start on
demand over the first ~15 RL steps at a few core-seconds each; the "warm-up s" column shows those steps.

Run: .venv/bin/python benchmarks/bench_rl.py [--help]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from machine_load import MachineLoad, add_grpo_workload, other_load  # benchmarks/ is on sys.path when a benchmark runs

# The one place each of these config keys is named.
BACKEND_KEY = "resources.rollout.engine.backend"
COLOCATE_KEY = "resources.rollout.colocate"
LEARNER_CPUS_KEY = "resources.learner.num_cpus"
COLOCATED_LEARNER_CPUS = 1.75  # both cores of this box as torch threads (rounded), 0.25 left for the per-step tasks
LEARNING_RATE = 1e-5  # rl.optimizer.lr here, learning_rate on TRL's side
PROJECT_PYTHON_ENV = "PEAR_RAY_BENCH_PYTHON"  # the project's interpreter, for a benchmark re-run in TRL's venv

PHASES = ("wait_seconds", "generate_seconds", "verify_seconds", "train_seconds", "sync_seconds", "step_seconds")
STEP_FIGURES = (*PHASES, "samples", "rollout_busy", "learner_busy", "staleness_mean")


@dataclass(frozen=True)
class Setting:
    """One way to run the RL stage: rollout backend, rollout actors, max_staleness, rollout colocated with the
    learner."""

    backend: str
    actors: int
    staleness: int
    colocate: bool = False

    @property
    def name(self) -> str:
        layout = "colocated" if self.colocate else f"split k={self.staleness}"
        return f"{layout}, {self.backend} x{self.actors}"

    def keys(self) -> dict:
        """The job keys this setting sets, dotted. Colocated, the learner's one rank takes the whole box (both cores):
        it generates and trains in turn."""
        keys = {BACKEND_KEY: self.backend, "resources.rollout.num_actors": self.actors,
                "rl.max_staleness": self.staleness}
        return keys | ({COLOCATE_KEY: True, LEARNER_CPUS_KEY: COLOCATED_LEARNER_CPUS} if self.colocate else {})


def job_tree(model: str, args, setting: Setting | None = None) -> dict:
    """The benchmark's workload as a pear_ray job (RL only), with `setting`'s keys when given."""
    steps = args.warmup + args.steps
    tree = {
        "name": "bench-rl", "seed": 0, "stages": ["rl"], "models": {"student": {"path": model}},
        "task": {"kind": "reasoning_gym", "name": "basic_arithmetic", "num_train": args.prompts, "num_eval": 2,
                 "args": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}},
        "sampling": {"temperature": 1.0, "max_tokens": args.max_tokens},
        "rl": {"steps": steps, "prompts_per_step": args.prompts_per_step, "group_size": args.group_size,
               "optimizer": {"lr": LEARNING_RATE}, "drop_constant_groups": False, "checkpoint_every": steps + 1},
        "resources": {"rollout": {"num_cpus": 0.5}, "learner": {"num_ranks": 1, "num_cpus": 0.5, "zero_stage": 2}},
    }
    from pear_ray.config import set_dotted

    for key, value in (setting.keys() if setting else {}).items():
        set_dotted(tree, key, value)
    return tree


def accepted(model: str, args, setting: Setting) -> str | None:
    """None when pear_ray's config takes the setting's keys, else why not (a setting not built yet)."""
    from pear_ray.config import ConfigError, parse_job

    try:
        parse_job(job_tree(model, args, setting))
    except ConfigError as error:
        return str(error).splitlines()[-1].strip()
    return None


def step_rows(run_dir: Path) -> list[dict]:
    """The RL steps' metrics rows, in step order, from the run folder's metrics.jsonl."""
    from pear_ray.tracking import read_metrics

    return sorted((r for r in read_metrics(run_dir) if r["stage"] == "rl"), key=lambda r: r["step"])


def run_cli(model: str, args, setting: Setting, run_dir: Path) -> list[dict]:
    """The setting as a user runs it: its job file through `pear-ray run` in a subprocess (the project's
    interpreter); returns its steps' rows."""
    return run_job_tree(job_tree(model, args, setting), run_dir)


def run_job_tree(tree: dict, run_dir: Path) -> list[dict]:
    """A job as a user runs it: its file through `pear-ray run` in a subprocess (the project's interpreter);
    returns its RL steps' rows."""
    run_dir.mkdir(parents=True)
    job_file = run_dir.parent / f"{run_dir.name}.yaml"
    job_file.write_text(yaml.safe_dump(tree, sort_keys=False))
    python = os.environ.get(PROJECT_PYTHON_ENV, sys.executable)
    tree = str(Path(__file__).resolve().parents[1])  # this checkout's pear_ray, as in this process
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tree, os.environ.get("PYTHONPATH")]))}
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as console:
        done = subprocess.run([python, "-m", "pear_ray.cli", "run", str(job_file), "--run-dir", str(run_dir)],
                              stdout=console, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode:
        tail = (run_dir.parent / f"{run_dir.name}.log").read_text().splitlines()[-15:]
        raise RuntimeError(f"pear-ray run {job_file} failed ({done.returncode}):\n" + "\n".join(tail))
    return step_rows(run_dir)


def run_in_process(model: str, args, setting: Setting, run_dir: Path) -> list[dict]:
    """The RL stage alone in this process, on the Ray instance this process started without a log folder."""
    from pear_ray.config import parse_job
    from pear_ray.runtime import init_ray
    from pear_ray.stages.common import Run
    from pear_ray.stages.rl import run_rl
    from pear_ray.tracking import MetricsLogger

    init_ray()
    job = parse_job(job_tree(model, args, setting))
    with MetricsLogger(run_dir, resume=False, loggers=()) as metrics:
        run_rl(Run(job, run_dir, metrics, Path(model)), "none", Path(model))
    return step_rows(run_dir)


def summarize(rounds: list[list[dict]], warmup: int) -> dict:
    """A setting's figures from its steps' rows, one list per round: samples/s per round (samples / median step
    seconds after the warm-up), their median, min and max; each step figure's median over every timed step; and
    the median step of the warm-up after the first (which starts the actors)."""
    timed = [rows[warmup:] for rows in rounds]
    per_round = [statistics.median(r["samples"] for r in rows) / statistics.median(r["step_seconds"] for r in rows)
                 for rows in timed]
    steps = [r for rows in timed for r in rows]
    warming = [r["step_seconds"] for rows in rounds for r in rows[1:warmup]]
    return {"samples_per_s": statistics.median(per_round), "min": min(per_round), "max": max(per_round),
            "rounds": per_round, "warmup_step_seconds": statistics.median(warming) if warming else float("nan"),
            **{key: statistics.median(r.get(key, 0.0) for r in steps) for key in STEP_FIGURES}}


def parse_settings(args) -> list[Setting]:
    return [Setting(backend, int(actors), int(k)) for backend in args.backends.split(",")
            for actors in args.actors.split(",") for k in args.staleness.split(",")]


def add_settings_args(parser) -> None:
    parser.add_argument("--backends", default="vllm,transformers", help=f"rollout backends ({BACKEND_KEY})")
    parser.add_argument("--actors", default="1,2")
    parser.add_argument("--staleness", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_grpo_workload(parser)
    add_settings_args(parser)
    parser.add_argument("--in-process", action="store_true", help="also run each setting as the stage alone in this "
                        "process (Ray without a log folder, no loggers), as this benchmark used to")
    parser.add_argument("--json", help="also write the per-setting figures here")
    args = parser.parse_args()

    from pear_ray.models import TinyModelSpec, build_tiny_model

    load_before = other_load()
    machine = MachineLoad()
    machine.start()
    wall = time.perf_counter()
    ways = {"cli": run_cli, **({"in-process": run_in_process} if args.in_process else {})}
    settings = [(setting, way) for setting in parse_settings(args) for way in ways]
    with tempfile.TemporaryDirectory() as folder:
        model = str(build_tiny_model(TinyModelSpec(), Path(folder) / "model"))
        rows = {entry: [] for entry in settings}
        try:
            for round_ in range(args.rounds):
                for setting, way in settings[round_ % len(settings):] + settings[:round_ % len(settings)]:
                    run_dir = Path(folder) / f"{setting.backend}-x{setting.actors}-k{setting.staleness}-{way}-r{round_}"
                    rows[setting, way].append(ways[way](model, args, setting, run_dir))
        finally:
            if args.in_process:
                import ray

                ray.shutdown()
    results = {f"{setting.name} ({way})": summarize(timed, args.warmup) for (setting, way), timed in rows.items()}

    print(f"\nRL stage throughput, tiny Qwen2 {TinyModelSpec()}: basic_arithmetic, {args.prompts_per_step} prompts x "
          f"{args.group_size} samples, <= {args.max_tokens} tokens, temperature 1, GRPO 1 update/step, clip 0.2/0.28, "
          f"token-mean, no KL; rollout actors and learner at 0.5 CPU each; {args.rounds} rounds x {args.steps} steps "
          f"after {args.warmup} warm-up; cli = `pear-ray run` as a user runs it, in-process = the stage alone")
    print(f"{'setting':>38} {'samples/s':>9} {'min-max':>13} {'warm-up s':>9} {'step s':>7} {'wait s':>7} {'gen s':>7} "
          f"{'verify s':>8} {'train s':>7} {'sync s':>7} {'rollout busy':>12} {'learner busy':>12} {'staleness':>9}")
    for name, m in results.items():
        print(f"{name:>38} {m['samples_per_s']:9.1f} {m['min']:6.1f}-{m['max']:<6.1f} {m['warmup_step_seconds']:9.3f} "
              f"{m['step_seconds']:7.3f} "
              f"{m['wait_seconds']:7.3f} {m['generate_seconds']:7.3f} {m['verify_seconds']:8.3f} "
              f"{m['train_seconds']:7.3f} {m['sync_seconds']:7.3f} {m['rollout_busy']:12.2f} "
              f"{m['learner_busy']:12.2f} {m['staleness_mean']:9.2f}")
    print("warm-up s = median step of the warm-up after the first; wait = driver waiting for the step's batch; gen = "
          "actor-seconds generating it; verify = decode, verifier tasks, advantages (what is left once generated); "
          "train = learner.step; sync = weights to the actors (at k >= 1 it waits for the generation in flight ahead "
          "of the update)")
    print(f"total run {time.perf_counter() - wall:.0f} s")
    print(machine.stop())
    print(f"machine before: {load_before}\nmachine after:  {other_load()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
