"""Arrow rows <-> padded tensors, the one conversion between the data plane and the models.

A row becomes `prompt + response` right-padded to the batch's longest row. Per-token columns are laid out
on the same [B, L] grid at the response positions (0 elsewhere), which `response_positions` selects. Two masks,
because a multi-turn response holds tokens the environment wrote (a tool's answer between turns, `policy_mask`
false): the model reads them as context (input_ids, attention_mask), but no loss or importance ratio may use them,
so `response_mask`, the mask objectives get, is true only at the tokens the policy sampled. Without a policy_mask
column the two masks are equal. Position i's token is predicted by the logits at i - 1: prompts are never empty,
so no response token sits at position 0.

`teacher_topk` becomes two tensors on the same grid with a last axis of K slots, K the most entries any token
has in the batch: `teacher_topk_ids` int64 and `teacher_topk_logprobs` float32 [B, L, K], a token's entries in
its first slots (best first, as stored); unused slots and non-response positions hold id 0 and log-prob -inf,
so exp(log-prob) is 0 there.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pear_ray.data import schema


def _lengths(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)


def _flat(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return pc.list_flatten(column).to_numpy(zero_copy_only=False)


def token_counts(table: pa.Table) -> np.ndarray:
    """Prompt + response tokens of each row: its length on the grid, unpadded."""
    return _lengths(table.column(schema.PROMPT_IDS)) + _lengths(table.column(schema.RESPONSE_IDS))


def _ragged_positions(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of `lengths[i]` consecutive cells starting at `starts[i]` in each row i."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    first_of_row = np.repeat(np.cumsum(lengths) - lengths, lengths)
    cols = np.repeat(starts, lengths) + np.arange(lengths.sum()) - first_of_row
    return rows, cols


def to_tensors(table: pa.Table, pad_id: int, columns: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Pad a batch: `input_ids`, `attention_mask`, `response_positions` (every response token), `response_mask`
    (the policy's response tokens) [B, L], each named per-token column on the grid (`teacher_topk` as the two
    [B, L, K] tensors above), and each named per-row column as a float32 [B] tensor."""
    prompt, response = table.column(schema.PROMPT_IDS), table.column(schema.RESPONSE_IDS)
    prompt_len, response_len = _lengths(prompt), _lengths(response)
    total = prompt_len + response_len
    shape = (table.num_rows, int(total.max(initial=1)))
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    prompt_rows, prompt_cols = _ragged_positions(np.zeros_like(prompt_len), prompt_len)
    response_rows, response_cols = _ragged_positions(prompt_len, response_len)
    input_ids[prompt_rows, prompt_cols] = _flat(prompt)
    input_ids[response_rows, response_cols] = _flat(response)
    response_positions = np.zeros(shape, dtype=bool)
    response_positions[response_rows, response_cols] = True
    response_mask = np.zeros(shape, dtype=bool)
    response_mask[response_rows, response_cols] = schema.policy_tokens(table)
    out = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(np.arange(shape[1])[None, :] < total[:, None]),
        "response_positions": torch.from_numpy(response_positions),
        "response_mask": torch.from_numpy(response_mask),
    }
    for name in columns:
        column = table.column(name)
        if name == schema.TEACHER_TOPK:
            out |= _topk_grids(column, shape, response_rows, response_cols)
            continue
        if not pa.types.is_list(column.type):  # one value per row, e.g. the advantage
            out[name] = torch.from_numpy(np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float32))
            continue
        grid = np.zeros(shape, dtype=np.float32)
        grid[response_rows, response_cols] = _flat(column)
        out[name] = torch.from_numpy(grid)
    return out


def _topk_grids(column: pa.ChunkedArray, shape: tuple[int, int], rows: np.ndarray,
                cols: np.ndarray) -> dict[str, torch.Tensor]:
    """The top-k entries of the response token at grid cell (rows[t], cols[t]) in that cell's first slots."""
    tokens = pc.list_flatten(column)  # one list of entries per response token, in grid order
    counts = _lengths(tokens)
    token, slot = _ragged_positions(np.zeros_like(counts), counts)
    entries = pc.list_flatten(tokens)
    ids = np.zeros((*shape, int(counts.max(initial=0))), dtype=np.int64)
    logprobs = np.full(ids.shape, -np.inf, dtype=np.float32)
    ids[rows[token], cols[token], slot] = pc.struct_field(entries, "id").to_numpy()
    logprobs[rows[token], cols[token], slot] = pc.struct_field(entries, "logprob").to_numpy()
    return {schema.TOPK_IDS: torch.from_numpy(ids), schema.TOPK_LOGPROBS: torch.from_numpy(logprobs)}


def from_tensor(values: torch.Tensor, response_positions: torch.Tensor,
                response_mask: torch.Tensor | None = None) -> pa.ListArray:
    """The inverse for a per-token column: one list<float32> per row, of the values at `response_positions` (one
    per response token); given the batch's `response_mask`, 0.0 at the environment's tokens, as the schema keeps
    them."""
    positions = response_positions.bool().cpu()
    values = values.detach().float().cpu()
    if response_mask is not None:
        values = torch.where(response_mask.bool().cpu(), values, 0.0)
    flat = values[positions].numpy()
    offsets = np.concatenate([[0], np.cumsum(positions.sum(dim=1).numpy())]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.float32()))
