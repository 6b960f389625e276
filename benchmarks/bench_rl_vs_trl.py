"""pear_ray's RL stage against TRL's GRPOTrainer on one machine, in one table (prints figures; not a test).

In alternating rounds (each round every setting once, starting one setting later each round, so that load from
other processes hits them alike), on the workload of benchmarks/machine_load.py's add_grpo_workload:
- pear_ray as a user runs it (bench_rl.py's `pear-ray run` of a job file, figures from the run's metrics.jsonl):
  the split pipeline at rl.max_staleness k=0 and k=1 with 1 and 2 rollout actors, vLLM and transformers backends;
  the colocated layout (resources.rollout.colocate, transformers backend, 1 actor) when pear_ray's config takes the
  key, else a row saying it is not available;
- TRL's GRPOTrainer by both harnesses of bench_trl_grpo.py (the project's and a peer's, each with its own timing),
  in this process.
The table: samples/s, median and min-max over rounds; the median step and its split (seconds waiting, generating,
training, syncing; rollout and learner busy); the share of the box other processes took while each setting ran.

A script of its own rather than bench_rl.py grown: TRL lives in a scratch venv (bench_trl_grpo.py makes it), so this
runner re-runs itself there and runs pear_ray's jobs with the project's interpreter, while bench_rl.py and
bench_trl_grpo.py stay usable alone, each in its own environment.

Run (about 12 minutes on a quiet 2-core box: each `pear-ray run` takes ~40 s, most of it start-up; 2 rounds of 8
settings, plus the colocated one once it exists, and TRL's two harnesses):
  .venv/bin/python benchmarks/bench_rl_vs_trl.py --out    (appends to benchmarks/results/rl_vs_trl_cpu_<date>.txt)
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_rl import PROJECT_PYTHON_ENV, Setting, accepted, add_settings_args, parse_settings, run_cli, summarize
from bench_trl_grpo import PEER, PROJECT, Workload, ensure_trl
from machine_load import MachineLoad, add_grpo_workload, measured, other_load

RESULTS = Path(__file__).parent / "results"
TRL_HARNESSES = {"TRL, project harness": PROJECT, "TRL, peer harness": PEER}


def trl_summary(runs: list[dict], timing: str) -> dict:
    """A TRL harness's runs as table figures: samples/s by its own timing; generation, and the rest of the step as
    training (reward, log-probs, backward, optimizer)."""
    per_round = [run[timing] for run in runs]
    step, generate, warmup = (statistics.median(run[key] for run in runs)
                              for key in ("step_seconds", "generate_seconds", "warmup_step_seconds"))
    return {"samples_per_s": statistics.median(per_round), "min": min(per_round), "max": max(per_round),
            "warmup_step_seconds": warmup, "step_seconds": step, "generate_seconds": generate,
            "train_seconds": step - generate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_grpo_workload(parser)
    add_settings_args(parser)
    parser.set_defaults(staleness="0,1")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of TRL's one process")
    parser.add_argument("--no-trl", action="store_true", help="pear_ray's settings only")
    parser.add_argument("--out", action="store_true", help=f"also append the table to {RESULTS.name}/"
                        "rl_vs_trl_cpu_<YYYY-MM-DD>.txt")
    parser.add_argument("--venv", type=Path, default=Path("/tmp/trl-venv"))
    parser.add_argument("--trl", default="1.16.0")
    args = parser.parse_args()
    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    if not args.no_trl:
        ensure_trl(args.venv, args.trl)  # re-runs this script in TRL's venv; pear_ray's jobs keep our interpreter

    from pear_ray.models import TinyModelSpec, build_tiny_model

    load_before = other_load()
    total = MachineLoad()
    total.start()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        model_dir = build_tiny_model(TinyModelSpec(), folder / "model")
        model = str(model_dir)
        colocated = [Setting(backend, 1, 0, colocate=True) for backend in args.backends.split(",")]
        missing = accepted(model, args, colocated[0])
        settings = [*parse_settings(args), *([] if missing else colocated)]
        entries = [s.name for s in settings] + ([] if args.no_trl else list(TRL_HARNESSES))
        workload = None if args.no_trl else Workload(args, folder, model_dir)
        runs, others = {name: [] for name in entries}, {name: [] for name in entries}
        for round_ in range(args.rounds):
            for name in entries[round_ % len(entries):] + entries[:round_ % len(entries)]:
                if name in TRL_HARNESSES:
                    run, share = measured(workload.run, TRL_HARNESSES[name], args.threads)
                else:
                    setting = next(s for s in settings if s.name == name)
                    run_dir = folder / f"{setting.name.replace(', ', '-').replace(' ', '')}-r{round_}"
                    run, share = measured(run_cli, model, args, setting, run_dir)
                runs[name].append(run)
                others[name].append(share)
        checks = [] if args.no_trl else [workload.prompt_check({n: runs[n] for n in TRL_HARNESSES}),
                                         workload.check_pear_ray_reward(runs["TRL, project harness"][-1]["record"]),
                                         workload.check_rule(runs["TRL, project harness"][-1]["record"])]
    figures = {name: trl_summary(runs[name], TRL_HARNESSES[name].timing) if name in TRL_HARNESSES
               else summarize(runs[name], args.warmup) for name in entries}

    python = sys.version.split()[0]
    lines = [f"$ {command}   ({time.strftime('%Y-%m-%d')}, Python {python}; pear_ray through `pear-ray run` with "
             f"{PROJECT_PYTHON_ENV} or this interpreter, TRL in {args.venv})",
             f"tiny Qwen2 {TinyModelSpec()}: basic_arithmetic, {args.prompts_per_step} prompts x {args.group_size} "
             f"samples, <= {args.max_tokens} tokens, temperature 1, 1 update per step, clip 0.2/0.28, token-mean, no "
             f"KL; pear_ray: rollout actors and learner at 0.5 Ray CPU each; TRL: one process, {args.threads} torch "
             f"threads; {args.rounds} alternating rounds x {args.steps} steps after {args.warmup} warm-up",
             f"{'setting':>30} {'samples/s':>9} {'min-max':>13} {'warm-up s':>9} {'step s':>7} {'wait s':>7} "
             f"{'gen s':>7} {'train s':>7} {'sync s':>7} {'rollout busy':>12} {'learner busy':>12} {'others':>6}"]
    dash = "-"
    for name, m in figures.items():
        cells = [f"{m[key]:7.3f}" if key in m else f"{dash:>7}"
                 for key in ("step_seconds", "wait_seconds", "generate_seconds", "train_seconds", "sync_seconds")]
        busy = [f"{m[key]:12.2f}" if key in m else f"{dash:>12}" for key in ("rollout_busy", "learner_busy")]
        lines.append(f"{name:>30} {m['samples_per_s']:9.1f} {m['min']:6.1f}-{m['max']:<6.1f} "
                     f"{m['warmup_step_seconds']:9.3f} {' '.join(cells)} "
                     f"{' '.join(busy)} {100 * statistics.median(others[name]):5.0f}%")
    if missing:
        lines.append(f"{'colocated':>30} not available: {missing}")
    lines += [
        "samples/s: per round, pear_ray = samples / median step s, TRL project harness the same, TRL peer harness = "
        "samples / wall-clock s of the timed steps; median and min-max over rounds. warm-up s: the median step of "
        "the warm-up after the first (pear_ray: task workers starting). Step figures: medians over the timed steps. "
        "pear_ray: wait = driver waiting for the step's batch, gen = actor-seconds generating it, train = "
        "learner.step, sync = weights to the actors. TRL: gen = transformers' generate, train = the rest of the "
        "step. others = share of the box other processes took while the setting ran (median over rounds).",
        *checks,
        f"total run {time.perf_counter() - started:.0f} s",
        total.stop(),
        f"machine before: {load_before}",
        f"machine after:  {other_load()}",
    ]
    report = "\n".join(lines)
    print("\n" + report)
    if args.out:
        path = RESULTS / f"rl_vs_trl_cpu_{time.strftime('%Y-%m-%d')}.txt"
        with open(path, "a") as file:
            file.write(report + "\n\n")
        print(f"written to {path}")


if __name__ == "__main__":
    main()
