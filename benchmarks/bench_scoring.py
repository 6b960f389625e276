"""Scoring throughput benchmark (prints figures; not a test).

Teacher-forced scoring of given (prompt, response) rows, the job's `score` stage, in response tokens per second:

- HF: a plain transformers fp32 forward in this process (`HfScorer`, padded chunks of --hf-rows-per-forward rows),
  no Ray: the baseline;
- Ray xN: the rollout/scoring service, N vLLM actors from `actors.roles.rollout_pool`, `pool.map("score", ...)` over
  Arrow batches of --batch-rows rows put in the object store once beforehand and passed by ObjectRef; timed from the
  first submit to the last batch done (the driver waits on the stats objects only, as the streaming stage does).
  Actor start-up (processes, vLLM engines, a first health call) and one warm-up batch per actor are excluded; start-up
  is reported apart.

All variants score the same rows (random token ids on a tiny Qwen2, hidden 128, 4 layers; prompts of --prompt-len
tokens, responses uniform in [--min-response, --max-response]), and the vLLM log-probs are checked against HF's. Every
pool stays up for the whole run and the variants take turns in rotating order, --rounds times; each round's
throughput is divided by that round's HF throughput, so drift from other work on a shared box partly cancels.
Each vLLM actor gets --actor-cpus Ray CPUs (Ray sets its OMP_NUM_THREADS, hence torch's thread count, to that; the
table shows what the actors report); HF runs with --hf-threads torch threads. On this 2-core box 1 thread per
process is the fair setting (2 threads slow down badly whenever anything else wants a core): Ray x1 and HF 1t use
one core, Ray x2 both.

Run: .venv/bin/python benchmarks/bench_scoring.py [--help]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa
from machine_load import MachineLoad, other_load  # benchmarks/ is on sys.path when a benchmark runs

from pear_ray.data import schema
from pear_ray.models import TinyModelSpec, build_tiny_model

SPEC = TinyModelSpec(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=256)
COLUMN = schema.REF_LOGPROBS  # any log-prob column; the scored output column


def make_rows(rows: int, prompt_len: int, min_response: int, max_response: int, vocab: int,
              seed: int = 0) -> pa.Table:
    """Random ids, avoiding the 3 special tokens (so no row stops early or means anything)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_response, max_response + 1, rows)
    return schema.conform(pa.table({
        schema.ID: [str(i) for i in range(rows)],
        schema.PROMPT_IDS: rng.integers(3, vocab, (rows, prompt_len)).tolist(),
        schema.RESPONSE_IDS: [rng.integers(3, vocab, int(n)).tolist() for n in lengths],
    }))


def flat(column) -> np.ndarray:
    return np.concatenate(column.to_pylist()).astype(np.float64)


class HfVariant:
    """The baseline: HfScorer in this process with `threads` torch threads (set around each pass only)."""

    def __init__(self, scorer, threads: int):
        self.scorer, self.threads, self.logprobs = scorer, threads, None

    def run(self, table: pa.Table) -> None:
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            self.logprobs = self.scorer.logprobs(table)
        finally:
            torch.set_num_threads(previous)


class PoolVariant:
    """N vLLM actors from actors.roles.rollout_pool; a pass maps `score` over the pre-put batch refs."""

    def __init__(self, model_dir: str, num_actors: int, actor_cpus: float, max_in_flight: int, warm_ref):
        import ray

        from pear_ray.actors.roles import rollout_pool
        from pear_ray.config import RolloutResources

        started = time.perf_counter()
        self.pool = rollout_pool(model_dir, RolloutResources(num_actors=num_actors, num_cpus=actor_cpus,
                                                             max_in_flight=max_in_flight), seed=0)
        self.num_actors = num_actors
        self.pool.call_all("health")
        self.startup = time.perf_counter() - started
        self.threads = ray.get([actor.__ray_call__.remote(_torch_threads) for actor in self.pool.actors])
        # One warm-up batch per actor (the least-loaded actor takes each new item, so they spread one each).
        list(self.pool.map("score", [warm_ref] * num_actors, column=COLUMN))
        self.busy: list[float] = []  # per pass: seconds the actors spent inside score(), summed
        self.per_actor: dict[int, int] = {}
        self.out_refs: dict = {}

    def run(self, refs: list) -> None:
        before = dict(self.pool.stats.per_actor_completed)
        busy = 0.0
        for index, batch_ref, stats in self.pool.map("score", refs, column=COLUMN):
            self.out_refs[index] = batch_ref  # the last pass's outputs, checked at the end
            busy += stats["seconds"]
        self.busy.append(busy)
        self.per_actor = {k: v - before.get(k, 0) for k, v in self.pool.stats.per_actor_completed.items()}

    def logprobs(self, table: pa.Table) -> np.ndarray:
        import ray

        scored = pa.concat_tables(ray.get([self.out_refs[i] for i in range(len(self.out_refs))]))
        assert scored.num_rows == table.num_rows
        assert scored.column(schema.ID).to_pylist() == table.column(schema.ID).to_pylist()
        return flat(scored.column(COLUMN))


def _torch_threads(actor) -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--min-response", type=int, default=64)
    parser.add_argument("--max-response", type=int, default=128)
    parser.add_argument("--batch-rows", type=int, default=128, help="rows per pool item (one Arrow batch)")
    parser.add_argument("--actors", default="1,2", help="rollout pool sizes to run")
    parser.add_argument("--actor-cpus", type=float, default=1.0,
                        help="Ray CPUs per vLLM actor (Ray sets its OMP_NUM_THREADS, so torch threads, to this)")
    parser.add_argument("--max-in-flight", type=int, default=2, help="batches queued per actor")
    parser.add_argument("--hf-threads", default="1", help="torch threads for HF baselines, e.g. 1,2 (the first is "
                                                          "the ratios' denominator)")
    parser.add_argument("--hf-rows-per-forward", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs every variant once over the data")
    args = parser.parse_args()
    actor_counts = [int(n) for n in args.actors.split(",") if n.strip()]
    hf_threads = [int(n) for n in args.hf_threads.split(",") if n.strip()]
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # inherited by the actors: keeps the table readable

    load_before = other_load()
    machine = MachineLoad()
    machine.start()
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        model_dir = str(build_tiny_model(SPEC, folder))
        table = make_rows(args.rows, args.prompt_len, args.min_response, args.max_response, SPEC.vocab_size)
        tokens = schema.response_token_count(table)

        import ray

        from pear_ray.engines.hf_scorer import HfScorer
        from pear_ray.runtime import init_ray

        scorer = HfScorer(model_dir, rows_per_forward=args.hf_rows_per_forward)
        variants: dict[str, object] = {f"HF {t}t": HfVariant(scorer, t) for t in hf_threads}
        for variant in variants.values():
            variant.run(table.slice(0, 4 * args.hf_rows_per_forward))  # warm-up
        # Every pool stays up for the whole run (idle actors take no CPU), so variants can take turns.
        init_ray(num_cpus=max(2.0, sum(actor_counts) * args.actor_cpus))
        try:
            refs = [ray.put(table.slice(i, args.batch_rows)) for i in range(0, table.num_rows, args.batch_rows)]
            for n in actor_counts:
                variants[f"Ray x{n}"] = PoolVariant(model_dir, n, args.actor_cpus, args.max_in_flight, refs[0])
            names = list(variants)
            baseline = names[0]
            seconds = {name: [] for name in names}
            ratios = {name: [] for name in names}  # throughput over the same round's baseline throughput
            for round_ in range(args.rounds):
                order = names[round_ % len(names):] + names[:round_ % len(names)]
                timed = {}
                for name in order:
                    start = time.perf_counter()
                    variants[name].run(refs if name.startswith("Ray") else table)
                    timed[name] = time.perf_counter() - start
                for name, t in timed.items():
                    seconds[name].append(t)
                    ratios[name].append(timed[baseline] / t)
            reference = flat(variants[baseline].logprobs)
            diffs = {name: float(np.abs(v.logprobs(table) - reference).max())
                     for name, v in variants.items() if isinstance(v, PoolVariant)}
        finally:
            for variant in variants.values():
                if isinstance(variant, PoolVariant):
                    variant.pool.shutdown()
            ray.shutdown()

    print(f"\nTeacher-forced scoring, tiny Qwen2 (hidden {SPEC.hidden_size}, {SPEC.num_layers} layers, vocab "
          f"{SPEC.vocab_size}, fp32): {args.rows} rows, prompt {args.prompt_len} + response "
          f"{args.min_response}-{args.max_response} tokens ({tokens} response tokens); Ray: batches of "
          f"{args.batch_rows} rows, {args.max_in_flight} in flight per actor, {args.actor_cpus:g} Ray CPU per actor; "
          f"HF: {args.hf_rows_per_forward} rows per forward; median of {args.rounds} rounds (variants take turns, "
          f"rotating order); 2-core box")
    print(f"{'variant':<9} {'threads':>7} {'seconds':>8} {'tokens/s':>9} {'vs ' + baseline:>8} {'range':>11} "
          f"{'per actor':>9} {'busy':>5} {'start s':>7} {'max|dlogp| vs HF':>16}")
    for name in names:
        variant = variants[name]
        t = statistics.median(seconds[name])
        ratio = statistics.median(ratios[name])
        spread = f"{min(ratios[name]):.2f}-{max(ratios[name]):.2f}"
        if isinstance(variant, PoolVariant):
            n = variant.num_actors
            busy = statistics.median(b / (n * s) for b, s in zip(variant.busy, seconds[name]))
            threads = ",".join(str(x) for x in variant.threads)
            extra = f"{tokens / t / n:9.0f} {busy:5.2f} {variant.startup:7.1f} {diffs[name]:16.1e}"
        else:
            threads, extra = str(variant.threads), f"{'':>9} {'':>5} {'':>7} {'':>16}"
        print(f"{name:<9} {threads:>7} {t:8.2f} {tokens / t:9.0f} {ratio:8.2f} {spread:>11} {extra}")
    pools = [name for name in names if name.startswith("Ray")]
    if len(pools) > 1:
        first, last = pools[0], pools[-1]
        speedup = statistics.median(a / b for a, b in zip(seconds[first], seconds[last]))
        print(f"scaling {first} -> {last}: {speedup:.2f}x (batches per actor in {last}'s last pass: "
              f"{sorted(variants[last].per_actor.values())})")
    print(f"'vs {baseline}' is the median over rounds of the throughput over that round's {baseline}; 'busy' is the "
          f"actors' time inside score() over actors x wall; start-up (actor processes + vLLM engines + a health call, "
          f"all actors of a pool at once) is excluded from seconds; total run {time.perf_counter() - wall:.0f} s")
    print(machine.stop())
    print(f"machine before: {load_before}\nmachine after:  {other_load()}")


if __name__ == "__main__":
    main()
