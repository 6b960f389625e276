"""Learner overhead benchmark (prints figures; not a test).

SFT step time of the DeepSpeed learner at world size 1 over a plain PyTorch loop, on the same model (a tiny Qwen2,
hidden 128, 4 layers), the same Arrow batch (16 rows x 128 tokens, 96 of them response), the same torch AdamW and
the same step: pad the Arrow batch (to_tensors), forward, token log-probs, PEAR token-level loss with its
diagnostics, backward, gradient-norm clipping at 1.0, optimizer step. The target is a ratio <= 1.2.

- in-process: a DeepSpeedLearner in this process (no Ray), for each ZeRO stage asked for;
- Ray: a one-rank LearnerGroup, the batch put in the object store once and passed by ObjectRef each step, the
  step timed from the driver (so the actor call and its reply are included).

All variants run in rotating order inside each round; each round's time is divided by that round's plain-loop time,
so drift on a shared machine cancels, and the figure is the median over rounds.

Run: .venv/bin/python benchmarks/bench_learner.py [--help]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch
from machine_load import free_port, rotating_rounds, time_steps  # benchmarks/ is on sys.path when a benchmark runs

from pear_ray.data import schema
from pear_ray.data.tensors import to_tensors
from pear_ray.models import TinyModelSpec, build_tiny_model
from pear_ray.objectives import PearSft, pear_loss, token_logprobs

TARGET_RATIO = 1.2
SPEC = TinyModelSpec(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=256)
LR, GRAD_CLIP, LEVEL = 1e-5, 1.0, "token"


def make_batch(rows: int, length: int, prompt_len: int, vocab: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    response_len = length - prompt_len
    return schema.conform(pa.table({
        schema.PROMPT_IDS: rng.integers(3, vocab, (rows, prompt_len)).tolist(),
        schema.RESPONSE_IDS: rng.integers(3, vocab, (rows, response_len)).tolist(),
        schema.BEHAVIOR_LOGPROBS: rng.uniform(-7.0, -5.0, (rows, response_len)).tolist(),
    }))


class PlainLoop:
    """The baseline: what a hand-written single-process trainer does per step."""

    def __init__(self, model_dir: str):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model.train()
        self.pad_id = int(self.model.config.pad_token_id or 0)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=0.0)

    def step(self, table: pa.Table) -> dict:
        batch = to_tensors(table, self.pad_id, (schema.BEHAVIOR_LOGPROBS,))
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.nn.functional.pad(token_logprobs(logits[:, :-1], batch["input_ids"][:, 1:]), (1, 0))
        loss, diag = pear_loss(logp, batch[schema.BEHAVIOR_LOGPROBS], batch["response_mask"], level=LEVEL)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), **diag.as_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--length", type=int, default=128, help="tokens per row, prompt + response")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the rounds")
    parser.add_argument("--stages", default="0,1,2,3", help="ZeRO stages run in-process")
    parser.add_argument("--ray-stages", default="2", help="ZeRO stages run as a 1-rank Ray LearnerGroup ('' skips)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in every variant (1: on a shared 2-core box, 2 OpenMP threads can run "
                             "several times slower than 1 once another process wants a core)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    threads = args.threads
    stages = [int(s) for s in args.stages.split(",") if s.strip()]
    ray_stages = [int(s) for s in args.ray_stages.split(",") if s.strip()]

    from pear_ray.engines.deepspeed_learner import DeepSpeedLearner

    groups = []
    with tempfile.TemporaryDirectory() as folder:
        model_dir = str(build_tiny_model(SPEC, folder))
        table = make_batch(args.rows, args.length, args.prompt_len, SPEC.vocab_size)
        tokens = args.rows * (args.length - args.prompt_len)
        plain = PlainLoop(model_dir)
        steps = {"plain torch": lambda: plain.step(table)}
        start_s = {}
        port = free_port()
        for stage in stages:
            t0 = time.perf_counter()
            engine = DeepSpeedLearner(model_dir, zero_stage=stage, lr=LR, grad_clip=GRAD_CLIP, master_port=port,
                                      num_threads=threads)
            start_s[f"DS ZeRO-{stage}"] = time.perf_counter() - t0
            steps[f"DS ZeRO-{stage}"] = (lambda e: lambda: e.step(table, PearSft(level=LEVEL)))(engine)
        if ray_stages:
            import ray

            from pear_ray.actors.learner import LearnerGroup
            from pear_ray.config import LearnerResources
            from pear_ray.runtime import init_ray

            init_ray(num_cpus=threads * len(ray_stages))
            table_ref = ray.put(table)
            for stage in ray_stages:
                t0 = time.perf_counter()
                group = LearnerGroup(model_dir, LearnerResources(num_ranks=1, zero_stage=stage, num_cpus=threads),
                                     lr=LR, grad_clip=GRAD_CLIP)
                start_s[f"Ray ZeRO-{stage}"] = time.perf_counter() - t0
                groups.append(group)
                steps[f"Ray ZeRO-{stage}"] = (lambda g: lambda: g.step(table_ref, PearSft(level=LEVEL)))(group)

        for step in steps.values():
            time_steps(step, args.warmup)
        names = list(steps)
        seconds, ratios = rotating_rounds(steps, args.rounds, lambda step: time_steps(step, args.steps_per_round),
                                          baseline="plain torch")
        for group in groups:
            group.shutdown()

    params = sum(p.numel() for p in plain.model.parameters())
    print(f"SFT step at world size 1, tiny Qwen2 ({params / 1e6:.2f}M params, hidden {SPEC.hidden_size}, "
          f"{SPEC.num_layers} layers, vocab {SPEC.vocab_size}), batch {args.rows} x {args.length} tokens "
          f"({tokens} response), PEAR {LEVEL}, torch AdamW, torch threads {threads}; "
          f"median of {args.rounds} rounds x {args.steps_per_round} steps")
    print(f"{'variant':<12} {'ms/step':>8} {'ratio':>6} {'ratio p25-p75':>14} {'start s':>8}  within {TARGET_RATIO}")
    for name in names:
        p25, ratio, p75 = statistics.quantiles(ratios[name], n=4)
        verdict = "" if name == "plain torch" else ("yes" if ratio <= TARGET_RATIO else "NO")
        start = f"{start_s[name]:.1f}" if name in start_s else ""
        print(f"{name:<12} {1e3 * statistics.median(seconds[name]):8.1f} {ratio:6.3f} {f'{p25:.3f}-{p75:.3f}':>14} "
              f"{start:>8}  {verdict}")


if __name__ == "__main__":
    main()
