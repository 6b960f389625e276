"""Masked reductions shared by every objective.

Off-mask entries are replaced by zero with ``torch.where`` (not multiplied by the mask), so padding that holds
NaN or inf never leaks into a result, and an empty mask gives 0 rather than 0/0.
"""

from __future__ import annotations

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(values where mask), over ``dim`` or over everything."""
    zeroed = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    return zeroed.sum() if dim is None else zeroed.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(values where mask) / max(count(mask), 1): the mean over the mask, 0 where the mask is empty."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)
