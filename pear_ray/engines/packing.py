"""Micro-batches by token budget, packed without padding: what bounds the learner's memory on long, uneven rows.

A rank's rows for one update are cut, in order, into micro-batches of at most `max_tokens` prompt + response tokens
(a longer row is a micro-batch of its own). A micro-batch keeps `to_tensors`' padded [B, L] grid for the objective
(small tensors, no activations), but the model sees its rows packed: the real tokens concatenated into one [1, T]
row, positions restarting at 0 for every sequence and no attention mask. transformers reads each restart as a new
sequence (masking_utils.find_packed_sequence_indices): sdpa, eager and flex attention get a block-diagonal causal
mask, flash attention the varlen boundaries, so attention never crosses sequences. The forward's per-token
results go back onto the grid (`unpack`), and objectives see the same tensors as with padding. The masks stay on
the grid too: a multi-turn row's environment tokens are packed as context like every other token of the row, and
only `response_mask` (the policy's tokens) decides what a loss reads, as with padding.

A dense block-diagonal mask still computes every pair of the packed row: with sdpa or eager attention a micro-batch
of T tokens costs T^2 in attention, so a budget near the longest row wins (benchmarks/bench_packing.py); flash
attention's varlen kernels cost only each sequence's own square.
"""

from __future__ import annotations

import numpy as np
import torch


def micro_batch_bounds(lengths: np.ndarray, max_tokens: int) -> list[tuple[int, int]]:
    """[start, end) of consecutive rows whose lengths add up to at most max_tokens; a longer row stands alone."""
    bounds, start, used = [], 0, 0
    for index, length in enumerate(lengths):
        if index > start and used + length > max_tokens:
            bounds.append((start, index))
            start, used = index, 0
        used += int(length)
    if len(lengths):
        bounds.append((start, len(lengths)))
    return bounds


def pack(grid: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L, ...] -> [1, T, ...]: the cells under the mask, row after row (T = the mask's count)."""
    return grid[attention_mask.bool()].unsqueeze(0)


def unpack(packed: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack`, differentiable: [1, T, ...] -> [B, L, ...], 0 off the mask."""
    mask = attention_mask.bool()
    grid = packed.new_zeros((*mask.shape, *packed.shape[2:]))
    return grid.index_put((mask,), packed[0])


def packed_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[1, T]: each packed token's position in its own row (0, 1, ... for every row of a right-padded batch)."""
    return pack(attention_mask.long().cumsum(1) - 1, attention_mask)
