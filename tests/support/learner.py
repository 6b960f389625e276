"""The learner tests' optimizer settings and synthetic batches."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pear_ray.data import schema

OPTIMIZER = dict(lr=1e-3, weight_decay=0.0, grad_clip=1.0, lr_schedule="cosine", total_steps=20, seed=0)


def make_batch(num_rows: int, seed: int, *, advantage: float | None = None) -> pa.Table:
    """Rows of different prompt and response lengths; behaviour log-probs around the tiny model's own (~ -6) so
    that PEAR's clipped log-ratios take both signs and the token weights are far from 1."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_rows):
        prompt = rng.integers(3, 380, int(rng.integers(2, 7))).tolist()
        response = rng.integers(3, 380, 2 + (5 * i + 3) % 11).tolist()
        n = len(response)
        rows.append({
            schema.PROMPT_IDS: prompt,
            schema.RESPONSE_IDS: response,
            schema.BEHAVIOR_LOGPROBS: rng.uniform(-7.5, -4.5, n).tolist(),
            schema.ROLLOUT_LOGPROBS: rng.uniform(-6.5, -5.5, n).tolist(),
            schema.REF_LOGPROBS: rng.uniform(-6.5, -5.5, n).tolist(),
            schema.ADVANTAGE: float(rng.normal()) if advantage is None else advantage,
        })
    return schema.validate(pa.Table.from_pylist(rows), vocab_size=384)


def as_multi_turn(table: pa.Table, seed: int) -> pa.Table:
    """The rows as multi-turn trajectories: about a third of each response's tokens after its first marked as the
    environment's (policy_mask false), their per-token log-probs 0.0 as the schema keeps them."""
    rng = np.random.default_rng(seed)
    lengths = pc.list_value_length(table.column(schema.RESPONSE_IDS)).to_pylist()
    policy = [[True] + (rng.uniform(size=n - 1) > 1 / 3).tolist() for n in lengths]
    table = schema.append_column(table, schema.POLICY_MASK, policy)
    for name in schema.PER_TOKEN_COLUMNS:
        if name in table.column_names:
            values = [[v if keep else 0.0 for v, keep in zip(row, flags, strict=True)]
                      for row, flags in zip(table.column(name).to_pylist(), policy, strict=True)]
            table = schema.append_column(table, name, values)
    return schema.validate(table, vocab_size=384)


def write_scored_sft_rows(path: Path, num_rows: int) -> Path:
    """A JSONL file of SFT rows that already carry behaviour log-probs, so a job's score stage only copies them (no
    vLLM): the data of the jobs that train a learner and stop or move it mid-SFT."""
    rng = np.random.default_rng(0)
    rows = [{"prompt_ids": rng.integers(3, 300, 6).tolist(), "response_ids": rng.integers(3, 300, 5).tolist(),
             "behavior_logprobs": (-rng.uniform(0.5, 3.0, 5)).tolist()} for _ in range(num_rows)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
