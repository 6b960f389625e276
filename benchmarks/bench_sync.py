"""Weight-sync benchmark (prints figures; not a test).

Time to hand the learner's weights to every rollout actor (`actors.roles.sync_weights`: the learner's state dict
put in the object store by rank 0, then `update_weights` on all actors, i.e. vLLM's in-place `reload_weights`),
with 1 and 2 rollout actors, and its share of a GRPO step in a job-like setting:

  generate   --prompts prompts x --samples samples, up to --max-tokens new tokens, temperature 1, with the pool
             (`pool.map("generate", ...)`, the prompts split into one batch per actor); the driver then fetches
             the batch, draws a random 0/1 reward per sample (a tiny random model solves nothing, so a verifier
             would give all-zero groups) and computes group-normalised advantages;
  rl_step    one GRPO update on the batch in a 1-rank DeepSpeed learner (ZeRO --zero-stage, torch AdamW,
             truncated importance correction against the rollout log-probs);
  sync       sync_weights(learner, pool, version) -> sync_seconds.

Each pool size runs --steps steps after --warmup untimed ones, against the same learner; the figures are medians.
After every sync the rollout actors' log-probs of a fixed probe batch are compared with the learner's
(mismatch_max, fp32: expect ~1e-6), and before the sync too (stale weights: shows the sync did something).
Every actor (learner rank, vLLM actor) gets --cpus Ray CPUs and as many torch threads; phases never overlap.

Run: .venv/bin/python benchmarks/bench_sync.py [--help]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch
from machine_load import MachineLoad, other_load  # benchmarks/ is on sys.path when a benchmark runs

from pear_ray.data import schema
from pear_ray.models import TinyModelSpec, build_tiny_model

SPEC = TinyModelSpec(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=256)


def make_prompts(model_dir: str, count: int) -> pa.Table:
    from transformers import AutoTokenizer

    from pear_ray.data.io import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    questions = [f"What is {17 * i + 3} + {5 * i + 11}? Think step by step, then give the final answer."
                 for i in range(count)]
    return pa.table({schema.ID: [str(i) for i in range(count)],
                     schema.PROMPT_IDS: [encode_prompt(tokenizer, q) for q in questions]})


def with_advantages(batch: pa.Table, rng: np.random.Generator) -> pa.Table:
    from pear_ray.objectives import group_advantages

    rewards = rng.integers(0, 2, batch.num_rows).astype(np.float32)
    groups = torch.from_numpy(np.array(batch.column(schema.GROUP_ID).to_numpy()))  # a writable copy
    advantages = group_advantages(torch.as_tensor(rewards), groups).numpy()
    batch = schema.append_column(batch, schema.REWARD, rewards)
    return schema.append_column(batch, schema.ADVANTAGE, advantages)


def run_steps(learner, pool, prompts: pa.Table, args, version: int, rng) -> tuple[list[dict], int]:
    import ray

    from pear_ray.actors.roles import mismatch, probe_batch, sync_weights
    from pear_ray.objectives import Grpo

    n = len(pool.actors)
    bounds = np.linspace(0, prompts.num_rows, n + 1).round().astype(int)  # one batch of prompts per actor
    parts = [ray.put(prompts.slice(a, b - a)) for a, b in zip(bounds[:-1], bounds[1:])]
    probe = None
    rows = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        done = {i: ref for i, ref, _ in pool.map("generate", parts, n=args.samples, seed=step,
                                                  max_tokens=args.max_tokens, temperature=1.0)}
        tables = ray.get([done[i] for i in range(len(parts))])
        # group ids are row numbers within each part: offset them by the part's first prompt
        offsets = np.repeat(bounds[:-1], [t.num_rows for t in tables])
        batch = pa.concat_tables(tables)
        batch = schema.append_column(batch, schema.GROUP_ID, batch.column(schema.GROUP_ID).to_numpy() + offsets)
        batch = with_advantages(batch, rng)
        batch_ref = ray.put(batch)
        t1 = time.perf_counter()
        stats = learner.step(batch_ref, Grpo())
        t2 = time.perf_counter()
        if probe is None:
            probe = probe_batch(batch, rows=args.probe_rows)
        stale = mismatch(learner, pool, probe)["mismatch_max"]  # outside the timed step
        version += 1
        t3 = time.perf_counter()
        synced = sync_weights(learner, pool, version)
        t4 = time.perf_counter()
        after = mismatch(learner, pool, probe)
        export_start = time.perf_counter()
        ray.wait([learner.weights_ref()], fetch_local=False)  # the learner-side part of a sync, alone
        export = time.perf_counter() - export_start
        if step >= args.warmup:
            rows.append({"generate": t1 - t0, "rl_step": t2 - t1, "sync": synced["sync_seconds"],
                         "sync_wall": t4 - t3, "step": (t2 - t0) + (t4 - t3), "export": export,
                         "stale_max": stale, "mismatch_max": after["mismatch_max"],
                         "mismatch_mean": after["mismatch_mean"], "samples": batch.num_rows,
                         "tokens": schema.response_token_count(batch), "loss": stats["loss"]})
    return rows, version


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt (GRPO group size)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--actors", default="1,2", help="rollout pool sizes to run")
    parser.add_argument("--cpus", type=float, default=1.0, help="Ray CPUs (and torch threads) per actor")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4, help="large enough that a step visibly moves the weights")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--probe-rows", type=int, default=8)
    args = parser.parse_args()
    actor_counts = [int(n) for n in args.actors.split(",") if n.strip()]
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # inherited by the actors: keeps the table readable

    import ray

    from pear_ray.actors.learner import LearnerGroup
    from pear_ray.actors.roles import rollout_pool
    from pear_ray.config import LearnerResources, RolloutResources
    from pear_ray.runtime import init_ray

    load_before = other_load()
    machine = MachineLoad()
    machine.start()
    wall = time.perf_counter()
    results, startup = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        model_dir = str(build_tiny_model(SPEC, folder))
        prompts = make_prompts(model_dir, args.prompts)
        init_ray(num_cpus=args.cpus * (1 + max(actor_counts)))
        learner = None
        try:
            t0 = time.perf_counter()
            learner = LearnerGroup(model_dir, LearnerResources(num_ranks=1, zero_stage=args.zero_stage,
                                                               num_cpus=args.cpus),
                                   lr=args.lr, temperature=1.0, seed=0)  # as generate samples
            startup["learner"] = time.perf_counter() - t0
            params = sum(t.numel() for t in ray.get(learner.weights_ref()).values())
            version, rng = 0, np.random.default_rng(0)
            for n in actor_counts:
                t0 = time.perf_counter()
                pool = rollout_pool(model_dir, RolloutResources(num_actors=n, num_cpus=args.cpus), seed=0)
                try:
                    pool.call_all("health")
                    startup[f"x{n}"] = time.perf_counter() - t0
                    results[n], version = run_steps(learner, pool, prompts, args, version, rng)
                finally:
                    pool.shutdown()
        finally:
            if learner is not None:
                learner.shutdown()
            ray.shutdown()

    def med(n: int, key: str) -> float:
        return statistics.median(r[key] for r in results[n])

    print(f"\nGRPO step vs weight sync, tiny Qwen2 (hidden {SPEC.hidden_size}, {SPEC.num_layers} layers, "
          f"{params / 1e6:.2f}M params, {4 * params / 2**20:.1f} MiB fp32): {args.prompts} prompts x "
          f"{args.samples} samples, <= {args.max_tokens} new tokens; learner 1 rank ZeRO-{args.zero_stage}; "
          f"{args.cpus:g} CPU and torch thread(s) per actor; median of {args.steps} steps after {args.warmup} "
          f"warm-up; 2-core box")
    print(f"{'actors':>6} {'samples':>7} {'resp tok':>8} {'generate s':>10} {'rl_step s':>9} {'sync s':>7} "
          f"{'step s':>7} {'sync share':>10} {'export s':>8} {'stale max':>9} {'mismatch max':>12} "
          f"{'mismatch mean':>13}")
    for n in results:
        share = statistics.median(r["sync"] / r["step"] for r in results[n])
        worst = max(r["mismatch_max"] for r in results[n])
        print(f"{n:>6} {med(n, 'samples'):7.0f} {med(n, 'tokens'):8.0f} {med(n, 'generate'):10.3f} "
              f"{med(n, 'rl_step'):9.3f} {med(n, 'sync'):7.3f} {med(n, 'step'):7.3f} {100 * share:9.1f}% "
              f"{med(n, 'export'):8.3f} {med(n, 'stale_max'):9.1e} {worst:12.1e} {med(n, 'mismatch_mean'):13.1e}")
    print("step = generate (+ driver reward/advantage) + rl_step + sync; sync = sync_seconds of sync_weights "
          "(learner export + update_weights on all actors); export = learner.weights_ref() alone; stale max = "
          "mismatch before the sync, mismatch max = worst after it over the steps")
    print("start-up s: " + ", ".join(f"{k} {v:.1f}" for k, v in startup.items())
          + f"; total run {time.perf_counter() - wall:.0f} s")
    print(machine.stop())
    print(f"machine before: {load_before}\nmachine after:  {other_load()}")


if __name__ == "__main__":
    main()
