"""The training objectives as pure torch functions and typed configs (no Ray): PEAR-weighted SFT over the NLL or a
top-k distillation loss, the GRPO family, on-policy distillation, plug-ins by import path, and pass@k.

The learner's `step(batch, objective)` takes any ObjectiveConfig (objectives/base.py says how); `RlObjective` is the
tagged union rl.objective accepts.
"""

from typing import Annotated

from pydantic import Discriminator, Tag

from pear_ray.objectives.base import LossTerms, ObjectiveConfig, ObjectiveInputs
from pear_ray.objectives.custom import CustomObjective
from pear_ray.objectives.distill import OnPolicyDistill, topk_forward_kl
from pear_ray.objectives.grpo import (
    AGGREGATIONS,
    Grpo,
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
    PearSft,
    pear_loss,
    pear_weights,
    token_logprobs,
)


def _rl_kind(value) -> str:
    """An RL objective without a `kind` is GRPO, so `rl.objective.kl_coef=0.1` alone works as an override."""
    return value.get("kind", "grpo") if isinstance(value, dict) else value.kind


RlObjective = Annotated[Annotated[Grpo, Tag("grpo")] | Annotated[OnPolicyDistill, Tag("on_policy_distill")] | Annotated[CustomObjective, Tag("custom")], Discriminator(_rl_kind)]

__all__ = [
    "AGGREGATIONS",
    "DELTA_CLIP",
    "LOG_WEIGHT_CLIP",
    "PEAR_LEVELS",
    "TARGET_MODES",
    "CustomObjective",
    "Grpo",
    "LossTerms",
    "ObjectiveConfig",
    "ObjectiveInputs",
    "OnPolicyDistill",
    "PearDiagnostics",
    "PearSft",
    "PolicyLossStats",
    "RlObjective",
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
    "topk_forward_kl",
]
