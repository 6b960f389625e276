"""Teacher-forced log-probs with a plain transformers forward: the learner's numerics, shared by the learner
(`forward`), the reference actor (`HfScorer`) and the transformers rollout engine's scoring (`teacher_forced`), so
their log-probs of the same ids can be compared exactly."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch
import torch.nn.functional as F

from pear_ray.data import schema
from pear_ray.data.tensors import from_tensor, to_tensors
from pear_ray.engines.packing import pack, packed_positions, unpack
from pear_ray.objectives import token_logprobs


def forward(model: torch.nn.Module, tensors: dict[str, torch.Tensor], temperature: float = 1.0, *,
            packed: bool = False):
    """[B, L] log-prob of each token given the tokens before it (0 at position 0, which nothing predicts), under
    logits / temperature: the distribution vLLM samples from at that temperature. And `candidates`: ids [B, L, K] ->
    [B, L, K], the log-probs of candidate tokens at each position (`logprobs_at`) from the same logits, with their
    gradient.

    packed: the model sees the rows packed into one sequence without padding (engines/packing.py); both results
    come back on the same [B, L] grid, 0 off the rows' tokens and at each row's first token.
    """
    input_ids, attention_mask = tensors["input_ids"], tensors["attention_mask"]
    if not packed:
        logits = _scaled_logits(model, temperature, input_ids=input_ids, attention_mask=attention_mask)
        return _next_token_logprobs(logits, input_ids), lambda candidate_ids: logprobs_at(logits, candidate_ids)
    positions = packed_positions(attention_mask)
    ids = pack(input_ids, attention_mask)
    logits = _scaled_logits(model, temperature, input_ids=ids, position_ids=positions)

    def on_grid(values: torch.Tensor) -> torch.Tensor:
        """A packed result back on the grid; a row's first token, predicted by the row before it, gets 0."""
        first = (positions == 0).view(*positions.shape, *[1] * (values.dim() - 2))
        return unpack(values.masked_fill(first, 0.0), attention_mask)

    return (on_grid(_next_token_logprobs(logits, ids)),
            lambda candidate_ids: on_grid(logprobs_at(logits, pack(candidate_ids, attention_mask))))


@torch.no_grad()
def teacher_forced(model: torch.nn.Module, tensors: dict[str, torch.Tensor], temperature: float = 1.0,
                   topk: int = 0) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """`forward`'s log-probs [B, L] of padded rows, without gradient; with topk > 0 also each position's k most
    likely tokens for the token there under the same logits, best first: (ids, log-probs) [B, L, K], the log-probs
    from `logprobs_at` (meaningless at position 0)."""
    input_ids = tensors["input_ids"]
    logits = _scaled_logits(model, temperature, input_ids=input_ids, attention_mask=tensors["attention_mask"])
    logp = _next_token_logprobs(logits, input_ids)
    if not topk:
        return logp, None
    best = F.pad(logits[:, :-1].topk(topk, dim=-1).indices, (0, 0, 1, 0))
    return logp, (best, logprobs_at(logits, best))


def _scaled_logits(model: torch.nn.Module, temperature: float, **inputs: torch.Tensor) -> torch.Tensor:
    logits = model(**inputs, use_cache=False).logits
    return logits / temperature if temperature != 1.0 else logits  # a division by 1 would only cost a copy


def _next_token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B, L]: log p(token t | tokens < t), 0 at position 0."""
    return F.pad(token_logprobs(logits[:, :-1], ids[:, 1:]), (1, 0))


def logprobs_at(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B, L, K]: at each position t, the log-probs (softmax over the whole vocabulary) of candidate ids [B, L, K]
    for token t (0 at position 0). Only the k gathered logits and one log-sum-exp per position are new tensors."""
    logits = logits[:, :-1].float()
    return F.pad(logits.gather(-1, ids[:, 1:]) - logits.logsumexp(-1, keepdim=True), (0, 0, 1, 0))


class HfScorer:
    """A frozen model that scores (prompt, response) ids teacher-forced, in row chunks to bound memory."""

    def __init__(self, model_dir: str | Path, *, dtype: torch.dtype = torch.float32, rows_per_forward: int = 32):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype).eval()
        self.pad_id = AutoTokenizer.from_pretrained(self.model_dir).pad_token_id or 0
        self.rows_per_forward = rows_per_forward

    def logprobs(self, table: pa.Table, temperature: float = 1.0) -> pa.ChunkedArray:
        """One list<float32> per row: the log-prob of each response token, under logits / temperature (0.0 at the
        environment's tokens of a multi-turn row, as the schema keeps them)."""
        chunks = []
        for start in range(0, table.num_rows, self.rows_per_forward):
            tensors = to_tensors(table.slice(start, self.rows_per_forward), self.pad_id)
            logprobs, _ = teacher_forced(self.model, tensors, temperature)
            chunks.append(from_tensor(logprobs, tensors["response_positions"], tensors["response_mask"]))
        return pa.chunked_array(chunks, type=schema.LOGPROBS_TYPE)
