"""GRPO family: group-normalised advantages, the clipped surrogate with separate low/high ranges (DAPO), truncated
importance sampling between rollout engine and learner (TIS), the k3 KL estimator, masked aggregation, and the
filter that drops groups carrying no reward signal.

Samples are rows and response tokens are columns of [B, L] tensors; a sample's group is given by an integer id.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from pear_ray.objectives.masked import masked_mean

AGGREGATIONS = ("token-mean", "sequence-mean")


@dataclass(frozen=True)
class PolicyLossStats:
    """Per-step statistics of the clipped surrogate over the response tokens."""

    clip_fraction: float  # tokens where the clipped branch of the surrogate was taken
    approx_kl: float  # k3 estimate of KL(pi_old || pi): mean(r - 1 - log r)
    mean_ratio: float  # mean r = pi / pi_old
    tis_capped_fraction: float  # tokens whose TIS weight hit the cap (0 without TIS)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """Reduce per-token values [B, L] over the response tokens to a scalar.

    token-mean:     sum_{b,t} v / sum_{b,t} 1           every token weighs the same (DAPO)
    sequence-mean:  mean_b (sum_t v / sum_t 1)          every sample weighs the same (GRPO paper); rows with no
                                                        response token are left out
    """
    if mode == "token-mean":
        return masked_mean(values, mask)
    if mode == "sequence-mean":
        return masked_mean(masked_mean(values, mask, dim=1), mask.bool().any(1))
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
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    logp_rollout: torch.Tensor | None = None,
    tis_cap: float = 2.0,
    aggregation: str = "token-mean",
) -> tuple[torch.Tensor, PolicyLossStats]:
    """Clipped surrogate, aggregated over the response tokens, and its stats.

        r_t = exp(logp_t - logp_old_t),   l_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A)

    logp_old is the learner's log-probs before the update. Given the rollout engine's log-probs, each l_t is
    multiplied by the truncated importance weight min(exp(logp_old_t - logp_rollout_t), tis_cap), detached (TIS),
    which corrects for the engine and the learner not computing the same distribution. advantages is [B] (one per
    sample) or [B, L].
    """
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
    loss = aggregate(per_token, mask, aggregation)
    with torch.no_grad():
        clip_fraction, approx_kl, mean_ratio, tis_capped_fraction = torch.stack([
            masked_mean((clipped < unclipped).to(ratio.dtype), mask),
            masked_mean(k3_kl(logp_old, logp), mask),
            masked_mean(ratio, mask),
            masked_mean(tis_capped.to(ratio.dtype), mask),
        ]).tolist()
    return loss, PolicyLossStats(clip_fraction, approx_kl, mean_ratio, tis_capped_fraction)


def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Dense group index 0..G-1 per sample, and G."""
    unique, index = torch.unique(group_ids, return_inverse=True)
    return index, unique.numel()


def _group_sum(values: torch.Tensor, index: torch.Tensor, n_groups: int) -> torch.Tensor:
    return values.new_zeros(n_groups).index_add_(0, index, values)
