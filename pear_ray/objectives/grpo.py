"""GRPO family: group-normalised advantages, the clipped surrogate with separate low/high ranges (DAPO), truncated
importance sampling between rollout engine and learner (TIS), the k3 KL estimator, masked aggregation, and the
filter that drops groups carrying no reward signal.

Samples are rows and response tokens are columns of [B, L] tensors; a sample's group is given by an integer id.
Every reduction runs over the mask, the tokens the policy sampled: in a multi-turn row the environment's tokens have
no ratio and count in no mean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from pydantic import Field

from pear_ray.data.schema import ADVANTAGE, REF_LOGPROBS, ROLLOUT_LOGPROBS
from pear_ray.objectives.base import LossTerms, ObjectiveConfig, ObjectiveInputs
from pear_ray.objectives.masked import masked_mean, masked_sum

AGGREGATIONS = ("token-mean", "sequence-mean")
CLIP_LOW, CLIP_HIGH = 0.2, 0.28  # DAPO's clip-higher: a wider upper range keeps low-probability tokens explorable
TIS_CAP = 2.0


@dataclass(frozen=True)
class PolicyLossStats:
    """Per-step statistics of the clipped surrogate over the response tokens."""

    clip_fraction: float  # tokens where the clipped branch of the surrogate was taken
    approx_kl: float  # k3 estimate of KL(pi_old || pi): mean(r - 1 - log r)
    mean_ratio: float  # mean r = pi / pi_old
    tis_capped_fraction: float  # tokens whose TIS weight hit the cap (0 without TIS)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_sums(cls, sums: dict[str, float]) -> PolicyLossStats:
        """From `surrogate`'s sums (of one batch, or added up over ranks and updates)."""
        n = max(sums["num_tokens"], 1.0)
        return cls(sums["clipped"] / n, sums["approx_kl_sum"] / n, sums["ratio_sum"] / n, sums["tis_capped"] / n)


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """Reduce per-token values [B, L] over the response tokens to a scalar.

    token-mean:     sum_{b,t} v / sum_{b,t} 1           every token weighs the same (DAPO)
    sequence-mean:  mean_b (sum_t v / sum_t 1)          every sample weighs the same (GRPO paper); rows with no
                                                        response token are left out
    """
    total, size = aggregate_terms(values, mask, mode)
    return total / size.clamp(min=1)


def aggregate_terms(values: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean"):
    """`aggregate` as (sum, count) before the division: the count is response tokens (token-mean) or rows with a
    response (sequence-mean), so sums and counts from several ranks add up to the global mean."""
    if mode == "token-mean":
        return masked_sum(values, mask), mask.bool().sum()
    if mode == "sequence-mean":
        rows = mask.bool().any(1)
        return masked_sum(masked_mean(values, mask, dim=1), rows), rows.sum()
    raise ValueError(f"unknown aggregation {mode!r}; expected one of {AGGREGATIONS}")


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """A_i = (r_i - mean_g r) / (std_g r + eps) over the samples of i's group g, or r_i - mean_g r when
    ``scale_by_std`` is False (Dr. GRPO). std is the unbiased (n - 1) one, as in GRPO; a one-sample group gets 0.
    rewards and group_ids are [N]; the ids need not be sorted or contiguous.
    """
    index, n_groups = _group_index(group_ids)
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    count = _group_sum(torch.ones_like(rewards), index, n_groups)
    centred = rewards - (_group_sum(rewards, index, n_groups) / count)[index]
    if not scale_by_std:
        return centred
    variance = _group_sum(centred.square(), index, n_groups) / (count - 1).clamp(min=1)
    return centred / (variance.sqrt()[index] + eps)


def informative_groups_mask(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Boolean keep-mask [N]: True for samples whose group's rewards are not all equal.

    A group where every sample scored the same has zero advantage everywhere and only dilutes the batch (DAPO's
    dynamic sampling drops it). ``keep.nonzero().squeeze(1)`` gives the indices.
    """
    index, n_groups = _group_index(group_ids)
    high = rewards.new_zeros(n_groups).scatter_reduce(0, index, rewards, "amax", include_self=False)
    low = rewards.new_zeros(n_groups).scatter_reduce(0, index, rewards, "amin", include_self=False)
    return (high > low)[index]


def k3_kl(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) on samples from pi: exp(ref - logp) - (ref - logp) - 1.

    Unbiased, always >= 0, and 0 where the two agree (Schulman, "Approximating KL divergence").
    """
    log_ratio = logp_ref - logp
    return log_ratio.exp() - log_ratio - 1


def policy_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = CLIP_LOW,
    eps_high: float = CLIP_HIGH,
    logp_rollout: torch.Tensor | None = None,
    tis_cap: float = TIS_CAP,
    aggregation: str = "token-mean",
) -> tuple[torch.Tensor, PolicyLossStats]:
    """Clipped surrogate, aggregated over the response tokens, and its stats.

        r_t = exp(logp_t - logp_old_t),   l_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A)

    logp_old is the learner's log-probs before the update. Given the rollout engine's log-probs, each l_t is
    multiplied by the truncated importance weight min(exp(logp_old_t - logp_rollout_t), tis_cap), detached (TIS),
    which corrects for the engine and the learner not computing the same distribution. advantages is [B] (one per
    sample) or [B, L].
    """
    per_token, sums = surrogate(logp, logp_old, advantages, mask, eps_low=eps_low, eps_high=eps_high,
                                logp_rollout=logp_rollout, tis_cap=tis_cap)
    return aggregate(per_token, mask, aggregation), PolicyLossStats.from_sums(sums)


def surrogate(logp, logp_old, advantages, mask, *, eps_low, eps_high, logp_rollout, tis_cap):
    """`policy_loss`'s per-token losses l_t [B, L] before aggregation, and additive sums of its statistics."""
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = (logp - logp_old).exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    tis_capped = torch.zeros_like(mask, dtype=torch.bool)
    if logp_rollout is not None:
        if not tis_cap > 0:
            raise ValueError(f"tis_cap must be > 0, got {tis_cap}; pass logp_rollout=None to turn TIS off")
        tis_weight = (logp_old - logp_rollout).detach().exp()
        tis_capped = tis_weight > tis_cap
        per_token = per_token * tis_weight.clamp(max=tis_cap)
    with torch.no_grad():
        values = torch.stack([
            mask.bool().sum().to(ratio.dtype),
            masked_sum((clipped < unclipped).to(ratio.dtype), mask),
            masked_sum(k3_kl(logp_old, logp), mask),
            masked_sum(ratio, mask),
            masked_sum(tis_capped.to(ratio.dtype), mask),
        ]).tolist()
    return per_token, dict(zip(("num_tokens", "clipped", "approx_kl_sum", "ratio_sum", "tis_capped"), values))


class ClippedSurrogate(ObjectiveConfig):
    """The settings of the clipped policy-gradient surrogate that GRPO and on-policy distillation share."""

    clip_low: float = Field(CLIP_LOW, ge=0, description="the surrogate clips the probability ratio pi / pi_old "
                            "below at 1 - clip_low")
    clip_high: float = Field(CLIP_HIGH, ge=0, description="and above at 1 + clip_high; wider than clip_low (DAPO's "
                             "clip-higher), so low-probability tokens stay explorable")
    tis_cap: float | None = Field(TIS_CAP, gt=0, description="cap on each token's truncated importance weight "
                                  "pi_old / pi_rollout, which corrects for the rollout engine and the learner not "
                                  "computing the same distribution (and for stale samples); null: no correction")
    loss_aggregation: Literal["token-mean", "sequence-mean"] = Field(
        "token-mean", description="token-mean: every response token of the batch weighs the same (DAPO); "
        "sequence-mean: each sample's mean over its tokens, then the mean over samples (the GRPO paper)")
    minibatches: int = Field(1, ge=1, description="optimizer updates per pass over a step's samples")
    epochs_per_batch: int = Field(1, ge=1, description="passes over a step's samples")

    def columns(self) -> tuple[str, ...]:
        return (ROLLOUT_LOGPROBS,) if self.tis_cap is not None else ()

    def on_policy(self) -> bool:
        return True

    def updates(self) -> tuple[int, int]:
        return self.minibatches, self.epochs_per_batch

    def surrogate_terms(self, inputs: ObjectiveInputs, advantages: torch.Tensor) -> LossTerms:
        """The aggregated surrogate of `advantages` ([B] or [B, L]) as loss terms, with its statistics."""
        per_token, sums = surrogate(inputs.logp, inputs.logp_old, advantages, inputs.mask, eps_low=self.clip_low,
                                    eps_high=self.clip_high, logp_rollout=inputs.columns.get(ROLLOUT_LOGPROBS),
                                    tis_cap=self.tis_cap or 0.0)
        total, size = aggregate_terms(per_token, inputs.mask, self.loss_aggregation)
        return LossTerms(total, size, sums)

    def report(self, stats: dict[str, float]) -> dict[str, float]:
        return PolicyLossStats.from_sums(stats).as_dict()


class Grpo(ClippedSurrogate):
    """GRPO's clipped surrogate on one advantage per sample (group-normalised by the RL stage), with DAPO's clip
    ranges, truncated importance sampling against the rollout engine, and an optional k3 KL penalty to the
    reference model."""

    kind: Literal["grpo"] = Field("grpo", description="the objective; an rl.objective without kind is grpo")
    kl_coef: float = Field(0.0, ge=0, description="weight of the k3 estimate of KL(policy || reference) per token, "
                           "aggregated as the surrogate is; 0: no penalty, and no reference model scored")

    def columns(self) -> tuple[str, ...]:
        return (ADVANTAGE, *super().columns(), *((REF_LOGPROBS,) if self.kl_coef > 0 else ()))

    def loss(self, inputs: ObjectiveInputs) -> LossTerms:
        terms = self.surrogate_terms(inputs, inputs.columns[ADVANTAGE])
        if self.kl_coef > 0:
            kl = k3_kl(inputs.logp, inputs.columns[REF_LOGPROBS])
            kl_total, _ = aggregate_terms(kl, inputs.mask, self.loss_aggregation)
            terms.total = terms.total + self.kl_coef * kl_total
            terms.stats["kl_ref_sum"] = float(masked_sum(kl.detach(), inputs.mask))
        return terms

    def report(self, stats: dict[str, float]) -> dict[str, float]:
        return {**super().report(stats), "kl_ref": stats.get("kl_ref_sum", 0.0) / max(stats["num_tokens"], 1.0)}


def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Dense group index 0..G-1 per sample, and G."""
    unique, index = torch.unique(group_ids, return_inverse=True)
    return index, unique.numel()


def _group_sum(values: torch.Tensor, index: torch.Tensor, n_groups: int) -> torch.Tensor:
    return values.new_zeros(n_groups).index_add_(0, index, values)
