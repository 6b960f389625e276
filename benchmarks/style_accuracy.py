"""Per arm of an addition experiment: how often the student opens in each style, and how often each style is right,
at RL step 1 (the saved rollouts of `rl.save_rollouts`: the SFT checkpoint's own samples on train prompts).

Separates the two ways an SFT arm can start RL better or worse: writing the style it can use more often, or getting
that style right more often. A response that opens as a trace (`Work:`) but never reaches `Answer:` is counted
apart as a hybrid: a trace's opening over a bare answer's body (`Work: 225`). Prints a table over the seeds.

    python benchmarks/style_accuracy.py runs/pear-fair-test [--step 1]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from transformers import AutoTokenizer

from pear_ray.data import schema
from pear_ray.tasks.addition import response_style

STYLES = ("trace", "bare", None)


HYBRID = "hybrid"


def step_figures(path: Path, tokenizer) -> dict:
    """{style: (samples, correct)} of one step's saved rollouts, and (samples, correct) of the hybrids."""
    table = pq.read_table(path, columns=[schema.RESPONSE_IDS, schema.REWARD])
    texts = tokenizer.batch_decode(table.column(schema.RESPONSE_IDS).to_pylist(), skip_special_tokens=True)
    rewards = table.column(schema.REWARD).to_numpy()
    out = {}
    for style in STYLES:
        chosen = np.array([response_style(text) == style for text in texts])
        out[style] = (int(chosen.sum()), int((rewards[chosen] >= 1.0).sum()))
    hybrid = np.array([response_style(text) == "trace" and "Answer:" not in text for text in texts])
    out[HYBRID] = (int(hybrid.sum()), int((rewards[hybrid] >= 1.0).sum()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job_dir", type=Path)
    parser.add_argument("--step", type=int, default=1)
    args = parser.parse_args()
    totals: dict[str, dict] = defaultdict(lambda: defaultdict(lambda: np.zeros(2, int)))
    seeds = sorted(args.job_dir.glob("seed*"))
    for seed_dir in seeds:
        tokenizer = AutoTokenizer.from_pretrained(seed_dir / "models" / "student")
        for arm_dir in sorted((seed_dir / "rollouts").glob("rl-*")):
            figures = step_figures(arm_dir / f"step-{args.step:06d}.parquet", tokenizer)
            for style, counts in figures.items():
                totals[arm_dir.name[3:]][style] += counts
    print(f"{args.job_dir}: RL step {args.step}, saved rollouts of {len(seeds)} seeds")
    print(f"{'arm':<14}{'samples':>8}{'trace share':>13}{'of which hybrid':>17}{'trace right':>13}"
          f"{'bare share':>12}{'bare right':>12}{'neither':>9}{'reward':>8}")
    for arm, by_style in totals.items():
        (trace_n, trace_c), (bare_n, bare_c), (other_n, other_c) = (by_style[s] for s in STYLES)
        samples, hybrid_n = trace_n + bare_n + other_n, by_style[HYBRID][0]
        print(f"{arm:<14}{samples:>8}{trace_n / samples:>13.3f}{hybrid_n / max(trace_n, 1):>17.3f}"
              f"{trace_c / max(trace_n, 1):>13.3f}{bare_n / samples:>12.3f}{bare_c / max(bare_n, 1):>12.3f}"
              f"{other_n / samples:>9.3f}{(trace_c + bare_c + other_c) / samples:>8.3f}")


if __name__ == "__main__":
    main()
