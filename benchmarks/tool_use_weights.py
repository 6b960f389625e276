"""PEAR's weights on a tool-use run's SFT data, per behaviour source (prints figures; not a test): how much the
sequence and token levels favour the tool-using rows over the bare answers under the shared prior, the student
every SFT variant starts from (the weights at SFT's first step, target mode online).

Run: .venv/bin/python benchmarks/tool_use_weights.py RUN_DIR (a finished `pear-ray run jobs/tool-use.yaml`)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from pear_ray.data import schema
from pear_ray.data.tensors import to_tensors
from pear_ray.engines.hf_scorer import HfScorer
from pear_ray.objectives import pear_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0, help="whose SFT data (seed<N>/data/sft.parquet)")
    args = parser.parse_args()
    [prior] = sorted((args.run_dir / "priors").iterdir())  # the shared prior (models.student.prior.seed)
    table = pq.read_table(args.run_dir / f"seed{args.seed}" / "data" / "sft.parquet")
    table = schema.append_column(table, schema.REF_LOGPROBS, HfScorer(prior).logprobs(table))
    tensors = to_tensors(table, 0, columns=(schema.REF_LOGPROBS, schema.BEHAVIOR_LOGPROBS))
    mask = tensors["response_mask"]  # the policy's tokens
    sources = np.array(table.column(schema.SOURCE).to_pylist())
    print(f"PEAR weights (paper's settings) of {args.run_dir}/seed{args.seed}'s SFT data under the prior {prior.name}")
    print(f"{'level':>8} {'source':>6} {'rows':>5} {'policy tokens/row':>17} {'mean token weight':>17} "
          f"{'first-token weight':>18}")
    for level in ("sequence", "token"):
        weights = pear_weights(tensors[schema.REF_LOGPROBS], tensors[schema.BEHAVIOR_LOGPROBS], mask, level=level)
        for source in sorted(set(sources), reverse=True):
            rows = torch.from_numpy(sources == source)
            row_mask, row_weights = mask[rows], weights[rows]
            first = torch.stack([w[m][0] for w, m in zip(row_weights, row_mask)])
            print(f"{level:>8} {source:>6} {int(rows.sum()):5d} {row_mask.sum(1).float().mean():17.1f} "
                  f"{row_weights[row_mask].mean():17.3f} {first.mean():18.3f}")


if __name__ == "__main__":
    main()
