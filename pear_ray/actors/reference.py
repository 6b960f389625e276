"""The reference actor: a frozen model that adds a log-prob column to a batch (the RL KL reference, PEAR's
frozen target, on-policy distillation's teacher), with the learner's numerics. Behaviour log-probs come from the
vLLM pool instead (pear_ray/stages/score.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import ray

from pear_ray.actors.pool import batch_stats
from pear_ray.data import schema
from pear_ray.engines.hf_scorer import HfScorer
from pear_ray.runtime import use_assigned_cpus
from pear_ray.storage import materialize


class ReferenceWorker:
    """Same `score` interface as the rollout service, so either can serve a scoring pool."""

    def __init__(self, model_dir: str | Path, *, rows_per_forward: int = 32):
        use_assigned_cpus()
        self.scorer = HfScorer(materialize(model_dir), rows_per_forward=rows_per_forward)
        self.vocab_size = self.scorer.model.config.vocab_size

    @ray.method(num_returns=2)
    def score(self, table: pa.Table, column: str = schema.REF_LOGPROBS, temperature: float = 1.0):
        """Add `column`: the teacher-forced log-prob of every response token under logits / temperature (RL's KL
        reference at the rollouts' temperature, like the policy's log-probs it is compared with)."""
        started = time.perf_counter()
        table = schema.validate(table, vocab_size=self.vocab_size)
        out = schema.append_column(table, column, self.scorer.logprobs(table, temperature), schema.LOGPROBS_TYPE)
        return out, batch_stats(out.num_rows, schema.response_token_count(out), started)
