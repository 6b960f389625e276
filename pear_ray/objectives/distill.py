"""Distillation: the teacher's top-k distribution as an SFT base loss, and on-policy distillation as an RL objective.

Top-k forward KL (the base loss of `PearSft(base_loss="distill")`). At response token t the data holds the teacher's
top-k candidates S_t with their log-probs lt_i. The teacher is renormalised over S_t, the student is not:

    p_i = exp(lt_i) / sum_{j in S_t} exp(lt_j),   q_i = the student's probability of i (softmax over the vocabulary)
    l_t = sum_{i in S_t} p_i (log p_i - log q_i)  =  KL(p || q restricted to S_t, renormalised) - log q(S_t)  >= 0

so the loss is 0 exactly when the student puts all its mass on S_t and ranks it as the teacher does. (Renormalising
the student over S_t as well, which a first version did, leaves its mass outside S_t free: in the pilot the student
put it there and sampled tokens the teacher never proposes.) It is the forward KL (mass-covering: the student is
pulled towards every candidate the teacher allows), the usual choice for distilling on the teacher's own samples,
and with k = 1 it is the NLL of the teacher's top token. PEAR weights multiply l_t exactly as they multiply the
NLL.

On-policy distillation (`OnPolicyDistill`). The student samples; the teacher scores every sampled token; the
per-token advantage is the negative reverse-KL estimate on the student's own sample,

    A_t = log pi_teacher(y_t | y_<t) - log pi_student_old(y_t | y_<t)   (+ reward_coef x the group advantage)

which the clipped surrogate then maximises: a dense, per-token signal where GRPO has one number per sample.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from pear_ray.data.schema import ADVANTAGE, TEACHER_LOGPROBS
from pear_ray.objectives.base import LossTerms, ObjectiveInputs
from pear_ray.objectives.grpo import ClippedSurrogate
from pear_ray.objectives.masked import masked_sum


def topk_forward_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """l_t [B, L] over the teacher's top-k support (module docstring), 0 off the response.

    student_logprobs (the student's log-softmax over the whole vocabulary, gathered) and teacher_logprobs are
    [B, L, K] over the same candidate ids; a slot whose teacher log-prob is -inf is no candidate. Computed in at
    least float32.
    """
    dtype = torch.promote_types(student_logprobs.dtype, torch.float32)
    candidate = torch.isfinite(teacher_logprobs) & mask.bool().unsqueeze(-1)
    has_any = candidate.any(-1, keepdim=True)
    # Positions without a candidate (padding) compute on a finite dummy and are zeroed below: an -inf there would
    # make NaN gradients through the masking.
    teacher = torch.where(candidate, teacher_logprobs.to(dtype), float("-inf"))
    teacher = torch.where(has_any, teacher, 0.0)
    log_p = teacher - teacher.logsumexp(-1, keepdim=True)
    per_slot = torch.where(candidate, log_p.exp() * (log_p - student_logprobs.to(dtype)), 0.0)
    return torch.where(mask.bool() & has_any.squeeze(-1), per_slot.sum(-1), 0.0)


class OnPolicyDistill(ClippedSurrogate):
    """On-policy distillation: the clipped surrogate on per-token advantages log pi_teacher - log pi_student of the
    student's own samples (pear_ray/objectives/distill.py), optionally plus `reward_coef` x the verifier's group advantage."""

    kind: Literal["on_policy_distill"] = Field("on_policy_distill", description="the objective")
    reward_coef: float = Field(0.0, ge=0, description="weight of the verifier's group advantage added per token; "
                               "0 distils only, and keeps groups whose rewards are all equal")

    def columns(self) -> tuple[str, ...]:
        reward = (ADVANTAGE,) if self.reward_coef > 0 else ()
        return (TEACHER_LOGPROBS, *reward, *super().columns())

    def loss(self, inputs: ObjectiveInputs) -> LossTerms:
        advantages = (inputs.columns[TEACHER_LOGPROBS] - inputs.logp_old).detach()
        if self.reward_coef > 0:
            advantages = advantages + self.reward_coef * inputs.columns[ADVANTAGE].unsqueeze(1)
        terms = self.surrogate_terms(inputs, torch.where(inputs.mask, advantages, 0.0))
        reverse_kl = inputs.logp_old - inputs.columns[TEACHER_LOGPROBS]
        terms.stats["reverse_kl_sum"] = float(masked_sum(reverse_kl, inputs.mask))
        return terms

    def report(self, stats: dict[str, float]) -> dict[str, float]:
        """Adds `reverse_kl`: the mean over sampled tokens of log pi_student - log pi_teacher, the estimate of
        KL(student || teacher) per token that the objective drives down."""
        return {**super().report(stats), "reverse_kl": stats["reverse_kl_sum"] / max(stats["num_tokens"], 1.0)}
