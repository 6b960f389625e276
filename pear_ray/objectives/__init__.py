"""The training objectives as pure torch functions (no Ray): PEAR-weighted SFT, the GRPO family, pass@k."""

from pear_ray.objectives.grpo import (
    AGGREGATIONS,
    PolicyLossStats,
    aggregate,
    group_advantages,
    informative_groups_mask,
    k3_kl,
    policy_loss,
)
from pear_ray.objectives.masked import masked_mean, masked_sum
from pear_ray.objectives.pass_at_k import mean_pass_at_k, pass_at_k
from pear_ray.objectives.pear import (
    DELTA_CLIP,
    LOG_WEIGHT_CLIP,
    PEAR_LEVELS,
    TARGET_MODES,
    PearDiagnostics,
    pear_loss,
    pear_weights,
    token_logprobs,
)

__all__ = [
    "AGGREGATIONS",
    "DELTA_CLIP",
    "LOG_WEIGHT_CLIP",
    "PEAR_LEVELS",
    "TARGET_MODES",
    "PearDiagnostics",
    "PolicyLossStats",
    "aggregate",
    "group_advantages",
    "informative_groups_mask",
    "k3_kl",
    "masked_mean",
    "masked_sum",
    "mean_pass_at_k",
    "pass_at_k",
    "pear_loss",
    "pear_weights",
    "policy_loss",
    "token_logprobs",
]
