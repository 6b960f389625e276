"""PEAR: importance-reweighted SFT (Zhang et al., arXiv 2602.01058), exactly as implemented here.

On the response tokens t = 1..T of a row that the policy sampled (counted along the mask, whatever the padding):

    d_t       = clip(lt_t - lb_t, dlo, dhi)                        target over behaviour, per token
    none:       log G_t = 0                                        canonical SFT
    sequence:   log G_t = sum_{j=1..T} d_j
    token:      log G_t = (T - t) log(gamma) + sum_{j>t} d_j
    block:      log G_t = (T - e_k) log(gamma) + sum_{j>e_k} d_j,  k = ceil(t / B), e_k = min(k B, T)
    w_t       = exp(clip(log G_t, lo, hi)), 0 off the response, a constant (no gradient)
    loss      = sum_t w_t l_t / N,  l_t the per-token base loss (NLL by default), N the batch's response tokens
                                    (normalize tokens) or sum_t w_t over them (normalize weights)

Within a batch both divisors weight tokens and rows alike (by w_t). Across batches they differ: with `tokens` a
batch's loss scales with its mean weight, so a batch the weights discount counts for less against the others; with
`weights` every batch's loss is a weighted mean, and batches count alike, as in canonical SFT. Neither sets an
effective learning rate: a scale common to every batch cancels in AdamW's update, and only gradient clipping, which
acts before AdamW, sees it.

The token level is the block level with B = 1, so both share one vectorised path.

Multi-turn rows. Tokens the environment wrote between turns (a tool's answer, `policy_mask` false) are not in the
mask: they have no ratio (d = 0 there, ratio 1), they do not break a suffix (token t's sum runs over the later
policy tokens, across environment tokens), and t, T and the blocks count policy tokens only. Why: a trajectory's
probability is the product of the policy's choices and the environment's answers, and the environment answers
alike whichever policy acts, so its factors cancel in every ratio target / behaviour; and gamma discounts per
decision of the policy, not per token a tool returned. A row's weights are therefore those of its policy tokens
alone, as one response.

(design notes: docs/design.md; every objective's math, in one place: docs/objectives.md)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from pear_ray.data.schema import BEHAVIOR_LOGPROBS, REF_LOGPROBS, TEACHER_TOPK, TOPK_IDS, TOPK_LOGPROBS
from pear_ray.objectives.base import LossTerms, ObjectiveConfig, ObjectiveInputs
from pear_ray.objectives.distill import topk_forward_kl
from pear_ray.objectives.masked import masked_sum

PEAR_LEVELS = ("none", "sequence", "token", "block")
TARGET_MODES = ("online", "frozen")
NORMALIZE = ("tokens", "weights")
GAMMA = 0.999
BLOCK_SIZE = 4
DELTA_CLIP = (-0.08, 0.3)
LOG_WEIGHT_CLIP = (-10.0, 5.0)


@dataclass(frozen=True)
class PearDiagnostics:
    """Weight statistics over the batch's response tokens, logged every step.

    A teacher much stronger than the student drives late-trace weights to the floor; ``frac_at_floor`` and
    ``ess_fraction`` are where that shows.
    """

    mean_weight: float
    ess: float  # effective sample size (sum w)^2 / sum w^2
    ess_fraction: float  # ess / num_tokens
    frac_at_floor: float  # log G at or below the lower log-weight clip
    frac_at_ceiling: float  # log G at or above the upper log-weight clip
    mean_log_ratio: float  # mean of lt - lb before clipping
    num_tokens: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_sums(cls, sums: dict[str, float]) -> PearDiagnostics:
        """From `weight_sums` (of one batch, or added up over ranks and updates)."""
        count = max(sums["num_tokens"], 1.0)
        ess = sums["weight_sum"] ** 2 / sums["weight_sq_sum"] if sums["weight_sq_sum"] > 0 else 0.0
        return cls(mean_weight=sums["weight_sum"] / count, ess=ess, ess_fraction=ess / count,
                   frac_at_floor=sums["at_floor"] / count, frac_at_ceiling=sums["at_ceiling"] / count,
                   mean_log_ratio=sums["log_ratio_sum"] / count, num_tokens=int(round(sums["num_tokens"])))


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log pi(labels_i | ...) for logits [..., V] already aligned with labels [...], in at least float32.

    Computed as -cross_entropy(reduction="none"): the fused kernel canonical SFT uses, so the PEAR path costs the
    same time and memory as the baseline. Labels equal to the ignore index -100 give 0; the mask must leave them out.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none", ignore_index=-100)
    return -nll.view_as(labels)


def pear_weights(
    logp_target: torch.Tensor,
    logp_behavior: torch.Tensor,
    mask: torch.Tensor,
    level: str = "token",
    gamma: float = GAMMA,
    block_size: int = BLOCK_SIZE,
    delta_clip: tuple[float, float] = DELTA_CLIP,
    log_weight_clip: tuple[float, float] = LOG_WEIGHT_CLIP,
) -> torch.Tensor:
    """PEAR weights w [B, L] (0 off the response, no gradient, float32 or wider) from [B, L] log-probs and a bool
    or 0/1 mask."""
    log_g = _log_weights(logp_target, logp_behavior, mask, level, gamma, block_size, delta_clip)
    return _clipped_exp(log_g, mask, log_weight_clip)


def pear_loss(
    token_logp: torch.Tensor,
    logp_behavior: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "token",
    gamma: float = GAMMA,
    block_size: int = BLOCK_SIZE,
    delta_clip: tuple[float, float] = DELTA_CLIP,
    log_weight_clip: tuple[float, float] = LOG_WEIGHT_CLIP,
    target_mode: str = "online",
    logp_target_frozen: torch.Tensor | None = None,
    per_token_loss: torch.Tensor | None = None,
    normalize: str = "tokens",
    num_tokens: int | torch.Tensor | None = None,
    weight_sum: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, PearDiagnostics]:
    """sum_t w_t l_t / N with l_t = per_token_loss (default -token_logp), and the weights' diagnostics.

    The target log-probs are token_logp detached (``online``) or ``logp_target_frozen`` (``frozen``). N is the
    number of response tokens in ``mask`` (``normalize='tokens'``) unless ``num_tokens`` is given, or the sum of the
    weights over them (``normalize='weights'``) unless ``weight_sum`` is given. Under data parallelism the global
    loss needs the global N: pass it when the ranks' gradients are summed, N_global / world_size (it may be
    fractional) when they are averaged (DeepSpeed, DDP). With level ``none`` this is exactly canonical SFT.
    """
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if num_tokens is not None and normalize != "tokens":
        raise ValueError(f"num_tokens is the divisor of normalize='tokens'; normalize is {normalize!r}")
    if weight_sum is not None and normalize != "weights":
        raise ValueError(f"weight_sum is the divisor of normalize='weights'; normalize is {normalize!r}")
    total, weights, sums = pear_terms(token_logp, logp_behavior, mask, level=level, gamma=gamma,
                                      block_size=block_size, delta_clip=delta_clip, log_weight_clip=log_weight_clip,
                                      target_mode=target_mode, logp_target_frozen=logp_target_frozen,
                                      per_token_loss=per_token_loss)
    if normalize == "tokens":
        divisor = mask.bool().sum() if num_tokens is None else torch.as_tensor(num_tokens, device=total.device)
    else:
        divisor = weights.sum() if weight_sum is None else torch.as_tensor(weight_sum, device=total.device)
    return divide(total, divisor), PearDiagnostics.from_sums(sums)


def pear_terms(token_logp, logp_behavior, mask, *, level, gamma, block_size, delta_clip, log_weight_clip,
               target_mode, logp_target_frozen, per_token_loss):
    """sum_t w_t l_t (with grad), the weights w [B, L], and the weights' `weight_sums`: pear_loss before dividing."""
    logp_target = _target_logp(token_logp, target_mode, logp_target_frozen)
    log_g = _log_weights(logp_target, logp_behavior, mask, level, gamma, block_size, delta_clip)
    weights = _clipped_exp(log_g, mask, log_weight_clip)
    base_loss = -token_logp if per_token_loss is None else per_token_loss
    total = masked_sum(weights * base_loss, mask)
    return total, weights, weight_sums(weights, log_g, logp_target, logp_behavior, mask, log_weight_clip)


def divide(total: torch.Tensor, divisor: torch.Tensor | float) -> torch.Tensor:
    """total / divisor in total's dtype; a batch without response tokens (divisor 0) gives 0 / tiny = 0, not NaN."""
    divisor = torch.as_tensor(divisor, device=total.device).to(total.dtype)
    return total / divisor.clamp(min=torch.finfo(total.dtype).tiny)


def _target_logp(token_logp: torch.Tensor, target_mode: str, frozen: torch.Tensor | None) -> torch.Tensor:
    if target_mode not in TARGET_MODES:
        raise ValueError(f"target_mode must be one of {TARGET_MODES}, got {target_mode!r}")
    if target_mode == "online":
        if frozen is not None:
            raise ValueError("logp_target_frozen is only read with target_mode='frozen'; the mode is 'online'")
        return token_logp.detach()
    if frozen is None:
        raise ValueError(
            "target_mode='frozen' needs logp_target_frozen: the student's log-probs before SFT, "
            "scored once by the reference actor"
        )
    return frozen


@torch.no_grad()
def _log_weights(logp_target, logp_behavior, mask, level, gamma, block_size, delta_clip) -> torch.Tensor:
    """Unclipped log G [B, L] (0 off the response) in float32 or wider."""
    if level not in PEAR_LEVELS:
        raise ValueError(f"unknown PEAR level {level!r}; expected one of {PEAR_LEVELS}")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if int(block_size) != block_size or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size}")
    if not logp_target.shape == logp_behavior.shape == mask.shape:
        raise ValueError(
            f"shapes differ: logp_target {tuple(logp_target.shape)}, "
            f"logp_behavior {tuple(logp_behavior.shape)}, mask {tuple(mask.shape)}"
        )
    mask = mask.bool()
    dtype = torch.promote_types(torch.promote_types(logp_target.dtype, logp_behavior.dtype), torch.float32)
    if level == "none":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    d = (logp_target.to(dtype) - logp_behavior.to(dtype)).clamp(*delta_clip)
    d = torch.where(mask, d, 0.0)
    if level == "sequence":
        log_g = d.sum(1, keepdim=True).expand_as(d)
    else:
        log_g = _discounted_sum_after_block(d, mask, 1 if level == "token" else int(block_size), math.log(gamma))
    return torch.where(mask, log_g, 0.0)


def _discounted_sum_after_block(d: torch.Tensor, mask: torch.Tensor, block_size: int, log_gamma: float):
    """(T - e_k) log(gamma) + sum_{j > e_k} d_j for every position, with k its block (d is 0 off the response).

    Scatter d into per-block sums, take the reversed cumulative sum over the blocks strictly after k, gather it
    back: positions come from the mask's cumsum, so any padding works, with no loop over rows or tokens.
    """
    position = mask.long().cumsum(1)  # t = 1..T on response tokens
    length = mask.long().sum(1, keepdim=True)  # T
    block = torch.where(mask, (position + block_size - 1) // block_size, 0)  # k >= 1; slot 0 collects padding
    block_end = torch.minimum(block * block_size, length)  # e_k
    n_slots = (d.shape[1] + block_size - 1) // block_size + 1
    block_sums = d.new_zeros(d.shape[0], n_slots).scatter_add_(1, block, d)
    sum_from = block_sums.flip(1).cumsum(1).flip(1)  # over blocks >= k
    sum_after = F.pad(sum_from[:, 1:], (0, 1))  # over blocks > k
    return (length - block_end).to(d.dtype) * log_gamma + sum_after.gather(1, block)


def _clipped_exp(log_g: torch.Tensor, mask: torch.Tensor, log_weight_clip: tuple[float, float]) -> torch.Tensor:
    return torch.where(mask.bool(), log_g.clamp(*log_weight_clip).exp(), 0.0)


@torch.no_grad()
def weight_sums(weights, log_g, logp_target, logp_behavior, mask, log_weight_clip) -> dict[str, float]:
    """Additive sums over the response tokens that `PearDiagnostics.from_sums` turns into the logged figures."""
    mask = mask.bool()
    sums = torch.stack([  # one device sync for all of them; weights are 0 off the response
        mask.sum().to(weights.dtype),
        weights.sum(),
        weights.square().sum(),
        (mask & (log_g <= log_weight_clip[0])).sum().to(weights.dtype),
        (mask & (log_g >= log_weight_clip[1])).sum().to(weights.dtype),
        masked_sum(logp_target.to(weights.dtype) - logp_behavior.to(weights.dtype), mask),
    ]).tolist()
    return dict(zip(("num_tokens", "weight_sum", "weight_sq_sum", "at_floor", "at_ceiling", "log_ratio_sum"), sums))


class PearSft(ObjectiveConfig):
    """PEAR-weighted SFT (level `none` is canonical SFT) over a per-token base loss: the NLL of the data's tokens,
    or (`base_loss: distill`) the forward KL from the teacher's top-k distribution (objectives/distill.py), which
    the weights multiply exactly as they multiply the NLL."""

    kind: Literal["pear_sft"] = Field("pear_sft", description="the objective's name; pear_sft is the only one")
    level: Literal["none", "sequence", "token", "block"] = Field(
        "token", description="a token's weight is the product of the (clipped) probability ratios target / "
        "behaviour of: none, no token (weight 1: canonical SFT); sequence, every token of its row (one weight per "
        "row); token, the tokens after it; block, the tokens after its block of block_size tokens")
    gamma: float = Field(GAMMA, gt=0, le=1, description="token and block levels: a token's weight is multiplied by "
                         "gamma per response token after it (after its block); 1: no discount")
    block_size: int = Field(BLOCK_SIZE, ge=1, description="block level: tokens per block, which share one weight")
    delta_clip: tuple[float, float] = Field(DELTA_CLIP, description="[low, high] bounds on each token's log-ratio "
                                            "log pi_target - log pi_behaviour (nats), before the weights sum them")
    log_weight_clip: tuple[float, float] = Field(LOG_WEIGHT_CLIP, description="[low, high] bounds on a weight's log "
                                                 "after the sum, so every weight lies in [e^low, e^high]")
    target_mode: Literal["online", "frozen"] = Field(
        "online", description="the target's log-probs: online, the model being trained (detached, from the loss's "
        "forward pass); frozen, the data's ref_logprobs, scored once before SFT by models.reference, else the "
        "student before SFT")
    normalize: Literal["tokens", "weights"] = Field(
        "tokens", description="the loss's divisor. tokens: the batch's response tokens, so a batch's loss scales "
        "with its mean weight, and a batch the weights discount counts for less against the other batches; "
        "weights: the sum of the weights over them, so every batch counts alike, as in canonical SFT. Within a "
        "batch the two differ by a constant only; a scale common to every batch cancels in AdamW's update, and only "
        "gradient clipping, which acts before it, sees it")
    base_loss: Literal["nll", "distill"] = Field(
        "nll", description="the per-token loss the weights multiply: nll, of the data's tokens; distill, the "
        "forward KL from the teacher's top-k in the data's teacher_topk column (score.teacher_topk)")

    @field_validator("delta_clip", "log_weight_clip")
    @classmethod
    def _ordered(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        if bounds[0] > bounds[1]:
            raise ValueError(f"lower bound {bounds[0]} is above upper bound {bounds[1]}")
        return bounds

    @property
    def weighted(self) -> bool:
        """Whether the weights depend on the data (every level but none)."""
        return self.level != "none"

    @property
    def reads_frozen_target(self) -> bool:
        """Whether the weights' target is the data's ref_logprobs (frozen) rather than the model being trained."""
        return self.weighted and self.target_mode == "frozen"

    @property
    def weight_settings(self) -> dict:
        """The settings `pear_weights` takes."""
        return self.model_dump(include={"level", "gamma", "block_size", "delta_clip", "log_weight_clip"})

    def columns(self) -> tuple[str, ...]:
        frozen = (REF_LOGPROBS,) if self.reads_frozen_target else ()
        teacher = (TEACHER_TOPK,) if self.base_loss == "distill" else ()
        return ((BEHAVIOR_LOGPROBS,) if self.weighted else ()) + frozen + teacher

    def optional_columns(self) -> tuple[str, ...]:
        return (BEHAVIOR_LOGPROBS,)  # level none reads none, but its diagnostics use them when the data has them

    def size_reads_model(self) -> bool:
        """Normalised by the weights, the size is their sum, and an online target's weights read the model."""
        return self.normalize == "weights" and self.weighted and not self.reads_frozen_target

    def loss(self, inputs: ObjectiveInputs) -> LossTerms:
        logp, mask = inputs.logp, inputs.mask
        behavior = inputs.columns.get(BEHAVIOR_LOGPROBS, torch.zeros_like(logp))
        frozen = self.reads_frozen_target
        per_token = None
        if self.base_loss == "distill":
            student = inputs.logprobs_at(inputs.columns[TOPK_IDS])
            per_token = topk_forward_kl(student, inputs.columns[TOPK_LOGPROBS], mask)
        total, weights, sums = pear_terms(
            logp, behavior, mask, **self.weight_settings, target_mode="frozen" if frozen else "online",
            logp_target_frozen=inputs.columns[REF_LOGPROBS] if frozen else None, per_token_loss=per_token)
        size = float(mask.sum()) if self.normalize == "tokens" else float(weights.sum())
        return LossTerms(total, size, sums)

    def report(self, stats: dict[str, float]) -> dict[str, float]:
        return PearDiagnostics.from_sums(stats).as_dict()
