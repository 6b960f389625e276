"""Multi-turn RL throughput (prints figures; not a test): RL samples/s when every sample is an episode with the
calculator environment, beside the single-turn addition task, on the same student, prompts and settings.

The student is the tiny model after a prior on the scripted tool_use policy (it calls the calculator on nearly every
prompt), so an episode is two policy turns: `<calc>345+678</calc>`, the tool's answer as a tool turn, then
`Answer: 1023`. The single-turn setting gives the same student the same prompts without the environment: it writes
its call, and the sample ends there (reward 0). Both run as a user runs them (`pear-ray run` of a job with stages
[rl], bench_rl.py's runner), one rollout actor and the learner at 0.5 CPU each, GRPO one update per step, every
group trained; figures after --warmup steps (a fresh Ray instance starts its task workers over the first steps), as
bench_rl.py computes them. The prior is trained once, in the first run (the calculator's: a tool_use prior needs the
environment), and the later runs start from its folder.

Run: .venv/bin/python benchmarks/bench_multi_turn.py [--help]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench_rl import run_job_tree, summarize  # benchmarks/ is on sys.path when a benchmark runs
from machine_load import MachineLoad, other_load

STUDENT = {"seed": 1, "hidden_size": 128, "num_heads": 4, "num_kv_heads": 4, "intermediate_size": 512}
PRIOR = {"policy": {"name": "tool_use", "p_tool": 1.0}, "steps": 300, "optimizer": {"lr": 3.0e-3}, "batch_size": 32,
         "num_prompts": 2048, "seed": 0}
SETTINGS = ("single-turn", "calculator")


def job_tree(student: dict, args, environment: bool) -> dict:
    """The RL-only job of one setting; `student` is its models.student section."""
    steps = args.warmup + args.steps
    task = {"kind": "addition", "args": {"digits": 3}, "num_train": args.prompts, "num_eval": 2}
    return {
        "name": "bench-multi-turn", "seed": 0, "stages": ["rl"], "models": {"student": student},
        "task": task | ({"environment": {"kind": "calculator", "max_turns": 3}} if environment else {}),
        "sampling": {"temperature": 1.0, "max_tokens": args.max_tokens},
        "rl": {"steps": steps, "prompts_per_step": args.prompts_per_step, "group_size": args.group_size,
               "optimizer": {"lr": 1e-5}, "drop_constant_groups": False, "checkpoint_every": steps + 1},
        "resources": {"rollout": {"num_cpus": 0.5, "engine": {"backend": args.backend}},
                      "learner": {"num_ranks": 1, "num_cpus": 0.5, "zero_stage": 2}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=24, help="sampling.max_tokens: per turn")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backend", default="vllm", help="resources.rollout.engine.backend")
    args = parser.parse_args()

    load_before = other_load()
    machine = MachineLoad()
    machine.start()
    wall = time.perf_counter()
    rows: dict[str, list[list[dict]]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as folder:
        student = {"tiny": STUDENT, "prior": PRIOR}
        for round_ in range(args.rounds):
            for name in SETTINGS[::-1] if round_ % 2 == 0 else SETTINGS:  # the first run (the prior's) has the tool
                run_dir = Path(folder) / f"{name}-r{round_}"
                rows[name].append(run_job_tree(job_tree(student, args, name == "calculator"), run_dir))
                if "tiny" in student:  # the prior this run trained: every later run starts from it
                    student = {"path": str(run_dir / "models" / "student-prior")}
    results = {name: summarize(timed, args.warmup) for name, timed in rows.items()}
    turns = {name: statistics.median(r.get("response_length", 0.0) for rounds in timed for r in rounds[args.warmup:])
             for name, timed in rows.items()}
    print(f"\nRL with and without the calculator environment, tiny Qwen2 {STUDENT} after a {PRIOR['steps']}-step "
          f"tool_use prior: 3-digit addition, {args.prompts_per_step} prompts x {args.group_size} samples, <= "
          f"{args.max_tokens} tokens a turn, {args.backend} x1; {args.rounds} rounds x {args.steps} steps after "
          f"{args.warmup} warm-up")
    print(f"{'setting':>12} {'samples/s':>9} {'min-max':>13} {'step s':>7} {'gen s':>7} {'verify s':>8} "
          f"{'train s':>7} {'response tokens':>15} {'tool share':>10}")
    for name, m in results.items():
        share = statistics.median(r.get("share_tool", float("nan")) for rounds in rows[name] for r in rounds)
        print(f"{name:>12} {m['samples_per_s']:9.1f} {m['min']:6.1f}-{m['max']:<6.1f} {m['step_seconds']:7.3f} "
              f"{m['generate_seconds']:7.3f} {m['verify_seconds']:8.3f} {m['train_seconds']:7.3f} "
              f"{turns[name]:15.1f} {share:10.2f}")
    ratio = results["calculator"]["samples_per_s"] / results["single-turn"]["samples_per_s"]
    print(f"calculator / single-turn samples/s: {ratio:.2f}")
    print(f"total run {time.perf_counter() - wall:.0f} s")
    print(machine.stop())
    print(f"machine before: {load_before}\nmachine after:  {other_load()}")


if __name__ == "__main__":
    main()
