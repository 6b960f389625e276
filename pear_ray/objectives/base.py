"""The learner's boundary: what it hands an objective, and what it gets back.

The learner is algorithm-blind. Per update it runs the forward pass, hands the objective `ObjectiveInputs` (the
response tokens' log-probs with their gradient, the batch's columns the objective declared, and the log-probs of
other candidate tokens for objectives that need more than the taken one), and gets `LossTerms` back: the loss as a sum over this rank's
tokens or rows, the size it is to be divided by (tokens, rows, a weight sum: this rank's part), and additive
statistics. The learner sums `size` over the ranks (and the micro-batches of a token budget) and divides, so the
averaged gradient is that of the global batch's loss whatever the split; it sums `stats` over ranks and updates and the objective's `report` turns the
global sums into the figures logged. An objective never sees the ranks, and the learner never sees a loss.

Every objective is a typed config (pydantic) that travels to the ranks as itself: its fields are its settings,
each default written once, here in objectives/.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict


@dataclass
class ObjectiveInputs:
    """One micro-batch's tensors (an update's rows, or a token budget's share of them), on the [B, L] grid of
    prompt + response tokens (right-padded), whether or not the model saw the rows packed."""

    logp: torch.Tensor  # log pi(token | prefix) under the weights being trained, with grad; 0 at position 0
    mask: torch.Tensor  # bool, the response tokens the policy sampled (the only ones a loss may use; not the
    # environment's tokens of a multi-turn row, which the model reads as context)
    columns: dict[str, torch.Tensor]  # the declared columns: per-token ones on the grid, per-row ones [B]
    logp_old: torch.Tensor | None = None  # before this step's first update, no grad (on-policy objectives only)
    logprobs_at: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    """`logprobs_at(ids [B, L, K])` -> [B, L, K]: the log-probs of candidate ids at each position, from the same
    forward pass as `logp` (with grad), for losses over more than the taken token (distillation)."""


@dataclass
class LossTerms:
    """An objective's result on one rank: loss = total / (global size), global size = the sum over ranks."""

    total: torch.Tensor  # scalar with grad: the sum of per-token (or per-row) losses
    size: torch.Tensor | float  # this rank's (or micro-batch's) part of the divisor
    stats: dict[str, float] = field(default_factory=dict)  # additive: summed over ranks and updates


class ObjectiveConfig(BaseModel):
    """Base of every objective: no settings of its own, only the hooks the learner calls."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def columns(self) -> tuple[str, ...]:
        """The batch columns `loss` reads, checked against the batch before the forward pass."""
        return ()

    def optional_columns(self) -> tuple[str, ...]:
        """Columns `loss` reads when the batch has them."""
        return ()

    def on_policy(self) -> bool:
        """True for losses on samples of the policy being trained (RL): the learner then scores at the sampling
        temperature, as the rollout sampled, and computes `logp_old` before the step's first update."""
        return False

    def updates(self) -> tuple[int, int]:
        """(minibatches, epochs): the step cuts its rows into minibatches and passes over them epochs times, one
        optimizer update each."""
        return 1, 1

    def size_reads_model(self) -> bool:
        """Whether `LossTerms.size` depends on the log-probs. A learner that accumulates micro-batches needs an
        update's size before its first backward: it takes it from `loss` on zero log-probs, or when this is True
        on those of an extra no-grad forward."""
        return False

    def loss(self, inputs: ObjectiveInputs) -> LossTerms:
        raise NotImplementedError

    def report(self, stats: dict[str, float]) -> dict[str, float]:
        """The figures to log from the global sums of `LossTerms.stats`."""
        return dict(stats)
