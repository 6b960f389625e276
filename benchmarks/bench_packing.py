"""Packing benchmark (prints figures; not a test): learner tokens/s with micro-batches packed by token budget vs
one padded forward per update.

A DeepSpeed learner at world size 1 in this process (ZeRO-2, fp32, torch AdamW) takes PEAR-SFT token-level steps on
one Arrow batch whose rows spread evenly from 16 to 512 tokens (prompt + response), shuffled. Padded, every row
costs the longest row's 512 positions; packed, only its own tokens, in micro-batches of at most `budget` tokens
(resources.learner.max_tokens_per_micro_batch). tokens/s counts the rows' real tokens. The variants run in rotating
order inside each round and the figure is the median over rounds; 'vs padded' is the median of each round's ratio.

Run: .venv/bin/python benchmarks/bench_packing.py [--help]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile

import numpy as np
import pyarrow as pa
import torch
from machine_load import (  # benchmarks/ is on sys.path when a benchmark runs
    MachineLoad,
    free_port,
    other_load,
    rotating_rounds,
    time_steps,
)

from pear_ray.data import schema
from pear_ray.data.tensors import token_counts
from pear_ray.engines.packing import micro_batch_bounds
from pear_ray.models import TinyModelSpec, build_tiny_model
from pear_ray.objectives import PearSft

SPEC = TinyModelSpec(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=256)
OBJECTIVE = PearSft(level="token")


def make_batch(rows: int, shortest: int, longest: int, prompt_len: int, vocab: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    lengths = rng.permutation(np.linspace(shortest, longest, rows).round().astype(int))
    return schema.conform(pa.table({
        schema.PROMPT_IDS: [rng.integers(3, vocab, prompt_len).tolist() for _ in lengths],
        schema.RESPONSE_IDS: [rng.integers(3, vocab, n - prompt_len).tolist() for n in lengths],
        schema.BEHAVIOR_LOGPROBS: [rng.uniform(-7.0, -5.0, n - prompt_len).tolist() for n in lengths],
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--shortest", type=int, default=16)
    parser.add_argument("--longest", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--budgets", default="512,1024,2048,4096", help="max_tokens_per_micro_batch values")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core box)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]

    from pear_ray.engines.deepspeed_learner import DeepSpeedLearner

    load_before = other_load()
    machine = MachineLoad()
    machine.start()
    with tempfile.TemporaryDirectory() as folder:
        model_dir = str(build_tiny_model(SPEC, folder))
        table = make_batch(args.rows, args.shortest, args.longest, args.prompt_len, SPEC.vocab_size)
        lengths = token_counts(table)
        tokens = int(lengths.sum())
        port = free_port()
        variants = {"padded": None, **{f"packed {budget}": budget for budget in budgets}}
        learners = {name: DeepSpeedLearner(model_dir, zero_stage=2, lr=1e-5, master_port=port,
                                           num_threads=args.threads, max_tokens_per_micro_batch=budget)
                    for name, budget in variants.items()}
        # warm-up, and each variant's first loss: all start from the same weights, so they should agree
        first_loss = {name: learner.step(table, OBJECTIVE)["loss"] for name, learner in learners.items()}
        steps = {name: functools.partial(learner.step, table, OBJECTIVE) for name, learner in learners.items()}
        seconds, ratios = rotating_rounds(steps, args.rounds, lambda step: time_steps(step, args.steps_per_round),
                                          baseline="padded")

    print(f"PEAR-SFT {OBJECTIVE.level} step at world size 1 (ZeRO-2, fp32), tiny Qwen2 (hidden {SPEC.hidden_size}, "
          f"{SPEC.num_layers} layers, vocab {SPEC.vocab_size}); {args.rows} rows of {args.shortest}..{args.longest} "
          f"tokens, {tokens} tokens in all ({args.rows * int(lengths.max())} positions padded); torch threads "
          f"{args.threads}; median of {args.rounds} rounds x {args.steps_per_round} step(s)")
    print(f"{'variant':<13} {'micro-batches':>13} {'ms/step':>8} {'tokens/s':>9} {'vs padded':>9} {'p25-p75':>11} "
          f"{'first loss rel. diff':>20}")
    for name, budget in variants.items():
        count = 1 if budget is None else len(micro_batch_bounds(lengths, budget))
        t = statistics.median(seconds[name])
        speedup = [1 / ratio for ratio in ratios[name]]
        p25, _, p75 = statistics.quantiles(speedup, n=4) if len(speedup) > 1 else (speedup[0],) * 3
        print(f"{name:<13} {count:>13} {1e3 * t:8.0f} {tokens / t:9.0f} {statistics.median(speedup):9.2f} "
              f"{f'{p25:.2f}-{p75:.2f}':>11} {first_loss[name] / first_loss['padded'] - 1:20.2e}")
    print(machine.stop())
    print(f"machine before: {load_before}\nmachine after:  {other_load()}")


if __name__ == "__main__":
    main()
