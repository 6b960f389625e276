"""Full fine-tuning vs LoRA, side by side in one run (prints figures; not a test).

1. Sync and learner memory, at the demo student's shape (tiny Qwen2, hidden 128) and at a Qwen2.5-0.5B shape (random
   weights built locally, vocabulary 151936, tied embeddings): a 1-rank DeepSpeed learner (ZeRO-2, fp32, torch AdamW)
   takes one SFT step on a fixed batch, then hands the policy to one transformers rollout actor --syncs times
   (`actors.roles.sync_weights`: the full weights, or under LoRA the adapters alone, through the object store).
   Printed: bytes per sync, median seconds per sync, the learner process's peak RSS (VmHWM) after the step.
2. RL samples/s on the demo's settings (jobs/demo.yaml: its student, 16 prompts x 8 samples of up to 48 tokens, 3-digit
   addition, one vLLM rollout actor, 0.5 CPU each), --rl-steps steps full and LoRA; samples/s over the steps after the
   first two (vLLM and the task workers warm up there).

LoRA: r --rank, alpha 2r, on q/k/v/o/gate/up/down. The goal (issue 21): an adapter sync of at most 1% of the
full-weight bytes at the 0.5B shape.

Run: .venv/bin/python benchmarks/bench_lora.py [--help]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml
from bench_gpu_learner import QWEN25_05B, build_model, make_batch  # benchmarks/ is on sys.path
from machine_load import MachineLoad, other_load

from pear_ray.models import TinyModelSpec, build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((ROOT / "jobs" / "demo.yaml").read_text())


def peak_rss(actor) -> int:
    """An actor process's peak resident memory (VmHWM), bytes."""
    import ray

    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) * 1024


def sync_figures(model_dir: Path, vocab: int, lora, syncs: int) -> dict:
    """One SFT step, then `syncs` syncs to one transformers actor: bytes, median seconds, the learner's peak RSS."""
    import ray

    from pear_ray.actors.learner import LearnerGroup
    from pear_ray.actors.roles import rollout_pool, sync_weights
    from pear_ray.config import LearnerResources, RolloutResources
    from pear_ray.objectives import PearSft

    learner = LearnerGroup(model_dir, LearnerResources(num_ranks=1, num_cpus=1, zero_stage=2), lora=lora, lr=1e-4,
                           total_steps=10)
    pool = rollout_pool(model_dir, RolloutResources(num_actors=1, num_cpus=1, engine={"backend": "transformers"}),
                        seed=0)
    try:
        learner.step(ray.put(make_batch(4, 64, 16, vocab)), PearSft(level="none"))
        seconds = [sync_weights(learner, pool, version)["sync_seconds"] for version in range(1, syncs + 1)]
        return {"bytes": learner.policy_nbytes, "seconds": statistics.median(seconds),
                "rss": peak_rss(learner.actors[0])}
    finally:
        pool.shutdown()
        learner.shutdown()


def rl_samples_per_second(folder: Path, lora: dict | None, steps: int) -> tuple[float, float]:
    """The demo's RL settings from its student as built (no prior, no SFT): samples/s and mean sync bytes."""
    from pear_ray.config import parse_job
    from pear_ray.stages import rl as rl_stage
    from pear_ray.stages.common import Run
    from pear_ray.tracking import MetricsLogger, read_metrics

    student = build_tiny_model(TinyModelSpec(**DEMO["models"]["student"]["tiny"]), folder / "student")
    job = parse_job({
        "name": "rl", "loggers": [], "seed": 0,
        "models": {"student": {"path": str(student), "lora": lora}},
        "task": DEMO["task"], "sampling": DEMO["sampling"],
        "rl": {**DEMO["rl"], "steps": steps, "drop_constant_groups": False},
        "resources": {key: DEMO["resources"][key] for key in ("rollout", "learner")},
    })
    run_dir = folder / ("lora" if lora else "full")
    with MetricsLogger(run_dir, resume=False, loggers=()) as metrics:
        rl_stage.run_rl(Run(job, run_dir, metrics, student), "none", student)
    rows = sorted((r for r in read_metrics(run_dir) if r["stage"] == "rl"), key=lambda r: r["step"])[2:]
    return (sum(r["samples"] for r in rows) / sum(r["step_seconds"] for r in rows),
            statistics.mean(r.get("sync_bytes", 0) for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--syncs", type=int, default=3)
    parser.add_argument("--rl-steps", type=int, default=10)
    parser.add_argument("--skip-05b", action="store_true", help="the tiny shape alone (the 0.5B one needs ~16 GB)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    from pear_ray.config import LoraConfig
    from pear_ray.runtime import init_ray

    lora = LoraConfig(r=args.rank, alpha=2 * args.rank)
    load_before = other_load()
    machine = MachineLoad()
    machine.start()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        init_ray(num_cpus=2)
        shapes = {"demo student": (build_tiny_model(TinyModelSpec(**DEMO["models"]["student"]["tiny"]),
                                                    folder / "tiny"), 384)}
        if not args.skip_05b:
            started = time.perf_counter()
            model_dir, params = build_model(folder / "05b", QWEN25_05B, 512, "cpu")
            print(f"Qwen2.5-0.5B shape: {params / 1e6:.1f}M parameters, built in {time.perf_counter() - started:.0f} s")
            shapes["Qwen2.5-0.5B"] = (model_dir, QWEN25_05B["vocab_size"])
        print(f"\n{'shape':>14} {'mode':>9} {'bytes/sync':>14} {'s/sync':>8} {'learner peak RSS':>17}")
        for name, (model_dir, vocab) in shapes.items():
            figures = {mode: sync_figures(model_dir, vocab, config, args.syncs)
                       for mode, config in (("full", None), (f"LoRA r{args.rank}", lora))}
            for mode, row in figures.items():
                print(f"{name:>14} {mode:>9} {row['bytes']:>14,} {row['seconds']:>8.3f} "
                      f"{row['rss'] / 2**30:>13.2f} GiB")
            full, adapter = figures["full"], figures[f"LoRA r{args.rank}"]
            print(f"{name:>14} adapter/full: bytes {adapter['bytes'] / full['bytes']:.2%}, seconds "
                  f"{adapter['seconds'] / full['seconds']:.2%}, peak RSS {adapter['rss'] / full['rss']:.2%}")
        print(f"\nRL on the demo's settings ({args.rl_steps} steps, the first 2 left out):")
        for mode, config in (("full", None), (f"LoRA r{args.rank}", {"r": args.rank, "alpha": 2 * args.rank})):
            rate, sync_bytes = rl_samples_per_second(folder, config, args.rl_steps)
            print(f"  {mode:>9}: {rate:7.1f} samples/s, {sync_bytes:,.0f} B per sync")
    print(f"\n{machine.stop()}\nmachine before: {load_before}\nmachine after:  {other_load()}")


if __name__ == "__main__":
    main()
