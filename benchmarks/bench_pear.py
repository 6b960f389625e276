"""PEAR overhead benchmark (prints figures; not a test).

1. PEAR-SFT step time over canonical-SFT step time (forward, loss, backward, AdamW step) on the tiny model and the
   same batch, for every level; the target is a ratio <= 1.05. Canonical SFT is F.cross_entropy over the response
   tokens. The behaviour log-probs are the model's own plus noise (a behaviour policy close to the student), so the
   weights spread around 1. Variants run in rotating order inside each round and each round's time is divided by
   that round's canonical time, so drift on a noisy machine cancels; a round keeps each variant's fastest step,
   and the figure is the median over rounds.
2. The weight computation alone for a 64 x 4096-token batch, per level, in milliseconds (median).

Run: .venv/bin/python benchmarks/bench_pear.py [--help]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from machine_load import MachineLoad, rotating_rounds  # benchmarks/ is on sys.path when a benchmark runs
from transformers import AutoModelForCausalLM

from pear_ray.models import TinyModelSpec, build_tiny_model
from pear_ray.objectives import PEAR_LEVELS, pear_loss, pear_weights, token_logprobs

TARGET_RATIO = 1.05


def response_mask(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """A response after a prompt of random length, with some right padding."""
    columns = torch.arange(length)
    start = torch.randint(length // 8, length // 2, (batch, 1), generator=generator)
    end = length - torch.randint(0, length // 8, (batch, 1), generator=generator)
    return (columns >= start) & (columns < end)


def make_step(model, optimizer, ids, mask, logp_behavior, level):
    """One SFT step; level None is canonical SFT with F.cross_entropy. Position i predicts ids[:, i + 1]."""
    labels, loss_mask = ids[:, 1:], mask[:, 1:]
    ignored = torch.where(loss_mask, labels, -100)

    def step():
        logits = model(input_ids=ids).logits[:, :-1]
        if level is None:
            loss = F.cross_entropy(logits.flatten(0, 1), ignored.flatten(), ignore_index=-100)
        else:
            loss, diagnostics = pear_loss(token_logprobs(logits, labels), logp_behavior, loss_mask, level=level)
            diagnostics.as_dict()  # a trainer logs these every step
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def fastest_step(step, n: int) -> float:
    """The fastest of n steps: load from other processes only ever adds time, so the minimum resists it."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_step_ratio(args) -> None:
    with tempfile.TemporaryDirectory() as folder:
        model = AutoModelForCausalLM.from_pretrained(build_tiny_model(TinyModelSpec(), folder))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(model.config.vocab_size, (args.batch, args.seq_len), generator=g)
    mask = response_mask(args.batch, args.seq_len, g)
    with torch.no_grad():
        own = token_logprobs(model(input_ids=ids).logits[:, :-1], ids[:, 1:])
    logp_behavior = own + args.behavior_noise * torch.randn(own.shape, generator=g)
    variants = {"canonical": None, **{level: level for level in PEAR_LEVELS}}
    steps = {name: make_step(model, optimizer, ids, mask, logp_behavior, level) for name, level in variants.items()}
    for step in steps.values():
        fastest_step(step, args.warmup)
    seconds, ratios = rotating_rounds(steps, args.rounds, lambda step: fastest_step(step, args.steps_per_round),
                                      baseline="canonical")
    params = sum(p.numel() for p in model.parameters())
    print(f"SFT step, tiny Qwen2 ({params / 1e6:.2f}M params, vocab {model.config.vocab_size}), batch "
          f"{args.batch} x {args.seq_len}, {int(mask[:, 1:].sum())} response tokens, {torch.get_num_threads()} "
          f"threads; median over {args.rounds} rounds of the fastest of {args.steps_per_round} steps")
    print(f"{'variant':<10} {'ms/step':>8} {'ratio':>6} {'ratio p25-p75':>14}  within {TARGET_RATIO}")
    for name in steps:
        p25, ratio, p75 = statistics.quantiles(ratios[name], n=4)
        verdict = "" if name == "canonical" else ("yes" if ratio <= TARGET_RATIO else "NO")
        spread = f"{p25:.3f}-{p75:.3f}"
        print(f"{name:<10} {1e3 * statistics.median(seconds[name]):8.2f} {ratio:6.3f} {spread:>14}  {verdict}")


def bench_weights(args) -> None:
    g = torch.Generator().manual_seed(1)
    mask = response_mask(args.weights_batch, args.weights_len, g)
    lb = -3 * torch.rand(mask.shape, generator=g)
    lt = lb + 0.2 * torch.randn(mask.shape, generator=g)
    print(f"\npear_weights alone, {args.weights_batch} x {args.weights_len} tokens, float32, "
          f"median of {args.weights_iters}")
    print(f"{'level':<10} {'ms':>8}")
    for level in PEAR_LEVELS:
        times = []
        for i in range(args.weights_iters + 2):
            start = time.perf_counter()
            pear_weights(lt, lb, mask, level)
            if i >= 2:  # two warmup calls
                times.append(time.perf_counter() - start)
        print(f"{level:<10} {1e3 * statistics.median(times):8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--behavior-noise", type=float, default=0.1,
                        help="std of the noise added to the model's own log-probs to make the behaviour log-probs")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant before the rounds")
    parser.add_argument("--weights-batch", type=int, default=64)
    parser.add_argument("--weights-len", type=int, default=4096)
    parser.add_argument("--weights-iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (0: torch's default). One by default: on a small shared "
                             "machine a multi-threaded op stalls whenever another process holds a core, which "
                             "blurs the ratio far more than the effect measured")
    parser.add_argument("--flush-denormal", action="store_true",
                        help="torch.set_flush_denormal(True): weights at the floor make tiny gradients, and "
                             "denormal floats slow CPU arithmetic")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(args.flush_denormal)
    torch.manual_seed(0)
    machine = MachineLoad()
    machine.start()
    bench_step_ratio(args)
    bench_weights(args)
    print(f"\n{machine.stop()}")


if __name__ == "__main__":
    main()
