"""The Arrow data plane: every column's name and type, and the checks a batch passes before training uses it.

Each stage reads only the columns it needs and appends its own. Token ids are those of ONE tokenizer
(the student's); per-token columns hold one value per response token, in order.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ID = "id"
PROMPT = "prompt"
RESPONSE = "response"
PROMPT_IDS = "prompt_ids"
RESPONSE_IDS = "response_ids"
BEHAVIOR_LOGPROBS = "behavior_logprobs"
REF_LOGPROBS = "ref_logprobs"
ROLLOUT_LOGPROBS = "rollout_logprobs"
REWARD = "reward"
ADVANTAGE = "advantage"
GROUP_ID = "group_id"
POLICY_VERSION = "policy_version"
FINISH_REASON = "finish_reason"
TASK = "task"
ANSWER = "answer"
METADATA = "metadata"  # JSON text: whatever the task's verifier needs beyond the answer
SOURCE = "source"  # which behaviour source wrote a row, e.g. "trace" / "bare" or a teacher's name
# Per response token, the teacher's most likely next tokens at that position as (id, log-prob), best first: at most
# k of them (fewer where the teacher's support is smaller), for a distillation loss over the teacher's top-k.
TEACHER_TOPK = "teacher_topk"
TOPK_IDS, TOPK_LOGPROBS = "teacher_topk_ids", "teacher_topk_logprobs"  # its [B, L, K] tensors (data/tensors.py)
TEACHER_LOGPROBS = "teacher_logprobs"  # the teacher's log-prob of each sampled token (on-policy distillation)
# Per response token of a multi-turn trajectory: true where the policy sampled it, false where the environment wrote
# it (a tool's answer between turns). Absent: every response token is the policy's (one prompt, one answer).
# Environment tokens are context only: no loss, no importance ratio, and per-token columns hold 0.0 there.
POLICY_MASK = "policy_mask"

TOKEN_COLUMNS = (PROMPT_IDS, RESPONSE_IDS)
PER_TOKEN_COLUMNS = (BEHAVIOR_LOGPROBS, REF_LOGPROBS, ROLLOUT_LOGPROBS, TEACHER_LOGPROBS)
# Every column with one entry per response token, whatever its type: what must stay as long as response_ids.
RESPONSE_ALIGNED_COLUMNS = (*PER_TOKEN_COLUMNS, TEACHER_TOPK, POLICY_MASK)
SCALAR_FLOAT_COLUMNS = (REWARD, ADVANTAGE)

LOGPROBS_TYPE = pa.list_(pa.float32())
TOPK_TYPE = pa.list_(pa.list_(pa.struct([("id", pa.int32()), ("logprob", pa.float32())])))
COLUMN_TYPES: dict[str, pa.DataType] = {
    ID: pa.string(),
    PROMPT: pa.string(),
    RESPONSE: pa.string(),
    PROMPT_IDS: pa.list_(pa.int32()),
    RESPONSE_IDS: pa.list_(pa.int32()),
    **{name: LOGPROBS_TYPE for name in PER_TOKEN_COLUMNS},
    REWARD: pa.float64(),  # the verifier's value exactly: float32 rounds 0.9999999999999999 up to 1.0
    ADVANTAGE: pa.float32(),
    GROUP_ID: pa.int64(),
    POLICY_VERSION: pa.int64(),
    FINISH_REASON: pa.string(),
    TASK: pa.string(),
    ANSWER: pa.string(),
    METADATA: pa.string(),
    SOURCE: pa.string(),
    TEACHER_TOPK: TOPK_TYPE,
    POLICY_MASK: pa.list_(pa.bool_()),
}

# Text a model reads or writes: refused, not converted, when the data holds anything else.
TEXT_COLUMNS = (PROMPT, RESPONSE)

# A log-probability above this is not a log-probability (allows for float round-off).
MAX_LOGPROB = 1e-3


class SchemaError(ValueError):
    """A batch that breaks the schema; names the source, row (1-based in the message, as JSONL lines are counted;
    `row` holds the 0-based index), column and offending value."""

    def __init__(self, message: str, *, source: str, column: str, row: int | None = None):
        where = f"{source}, column {column!r}" + (f", row {row + 1}" if row is not None else "")
        super().__init__(f"{where}: {message}")
        self.source, self.column, self.row = source, column, row


def conform(table: pa.Table | pa.RecordBatch, source: str = "batch") -> pa.Table:
    """Cast every known column to its schema type (e.g. JSON's int64 lists to int32); others pass through."""
    table = pa.table(table) if isinstance(table, pa.RecordBatch) else table
    for index, name in enumerate(table.column_names):
        wanted = COLUMN_TYPES.get(name)
        if wanted is None or table.schema.field(name).type == wanted:
            continue
        if name in TEXT_COLUMNS and not is_text(table.schema.field(name).type):
            raise SchemaError(f"has type {table.schema.field(name).type}, expected text (a number or a list as a "
                              "prompt or response is a mistake, not something to guess a string for)",
                              source=source, column=name)
        try:
            table = table.set_column(index, pa.field(name, wanted), table.column(name).cast(wanted))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            actual = table.schema.field(name).type
            raise SchemaError(f"has type {actual}, expected {wanted} ({error})", source=source, column=name) from None
    return table


def is_text(type: pa.DataType) -> bool:
    return pa.types.is_string(type) or pa.types.is_large_string(type)


def type_name(type: pa.DataType) -> str:
    """A column type as messages name it: `text`, or Arrow's name (e.g. list<item: int32>)."""
    return "text" if is_text(type) else str(type)


def validate(
    table: pa.Table | pa.RecordBatch,
    *,
    required: Iterable[str] = (PROMPT_IDS, RESPONSE_IDS),
    vocab_size: int | None = None,
    source: str = "batch",
    row_offset: int = 0,
) -> pa.Table:
    """Conform a batch to the schema and refuse it, naming row and column, if it cannot train a model.

    Checks: required columns present; no nulls; non-empty prompts and responses; token ids in
    [0, vocab_size); every per-token column (and teacher_topk, policy_mask) as long as the response; log-probs
    finite and <= 0; at least one top-k entry per policy token (an environment token may have none), its ids in the
    vocabulary; at least one policy token per row; rewards and advantages finite. Returns the conformed table.
    """
    table = conform(table, source)
    missing = [name for name in required if name not in table.column_names]
    if missing:
        raise SchemaError(f"missing (the batch has {table.column_names})", source=source, column=", ".join(missing))

    def fail(message: str, column: str, row: int) -> None:
        raise SchemaError(message, source=source, column=column, row=row_offset + int(row))

    checked_first = (*TOKEN_COLUMNS, POLICY_MASK)  # teacher_topk's check reads the policy mask
    present = [name for name in dict.fromkeys((*checked_first, *COLUMN_TYPES)) if name in table.column_names]
    for name in present:
        column = table.column(name).combine_chunks()
        if column.null_count and name in (*required, *TOKEN_COLUMNS, *RESPONSE_ALIGNED_COLUMNS):
            fail("is null", name, _first(pc.is_null(column)))
        if name in TOKEN_COLUMNS:
            lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
            if (lengths == 0).any():
                fail("is empty (every row needs at least one token)", name, np.flatnonzero(lengths == 0)[0])
            if vocab_size is not None:
                ids = pc.list_flatten(column).to_numpy()
                bad = (ids < 0) | (ids >= vocab_size)
                if bad.any():
                    row = pc.list_parent_indices(column).to_numpy()[np.flatnonzero(bad)[0]]
                    value = ids[np.flatnonzero(bad)[0]]
                    fail(f"token id {value} is outside the vocabulary [0, {vocab_size})", name, row)
        elif name in PER_TOKEN_COLUMNS:
            _check_per_token(column, table, name, fail)
        elif name == TEACHER_TOPK:
            _check_topk(column, table, vocab_size, fail)
        elif name == POLICY_MASK:
            _check_policy_mask(column, table, fail)
        elif name in SCALAR_FLOAT_COLUMNS:
            values = column.to_numpy(zero_copy_only=False)
            if not np.isfinite(values).all():
                row = np.flatnonzero(~np.isfinite(values))[0]
                fail(f"value {values[row]} is not finite", name, row)
    return table


def _check_per_token(column: pa.ListArray, table: pa.Table, name: str, fail) -> None:
    _check_length(column, table, name, fail)
    values = pc.list_flatten(column).to_numpy()
    bad = ~np.isfinite(values) | (values > MAX_LOGPROB)
    if bad.any():
        first = np.flatnonzero(bad)[0]
        row, position = _locate(column, first)
        fail(f"value {values[first]} at response token {position} is not a log-probability", name, row)


def _check_topk(column: pa.ListArray, table: pa.Table, vocab_size: int | None, fail) -> None:
    """One non-empty list of (id, log-prob) entries per response token, ids in the vocabulary: what the
    distillation loss indexes the student's log-probs with."""
    _check_length(column, table, TEACHER_TOPK, fail)
    tokens = pc.list_flatten(column)  # one list of (id, log-prob) entries per response token
    counts = pc.fill_null(pc.list_value_length(tokens), 0).to_numpy(zero_copy_only=False)
    empty = (counts == 0) & policy_tokens(table)
    if empty.any():
        row, position = _locate(column, np.flatnonzero(empty)[0])
        fail(f"has no entries at response token {position}, which the policy wrote", TEACHER_TOPK, row)
    entries = pc.list_flatten(tokens)
    token_of_entry = pc.list_parent_indices(tokens).to_numpy()
    ids = pc.struct_field(entries, "id").to_numpy(zero_copy_only=False)
    logprobs = pc.struct_field(entries, "logprob").to_numpy(zero_copy_only=False)
    if vocab_size is not None and not ((ids >= 0) & (ids < vocab_size)).all():  # a null id (nan) fails too
        first = np.flatnonzero(~((ids >= 0) & (ids < vocab_size)))[0]
        row, position = _locate(column, token_of_entry[first])
        fail(f"id {ids[first]} at response token {position} is outside the vocabulary [0, {vocab_size})",
             TEACHER_TOPK, row)
    bad = ~np.isfinite(logprobs) | (logprobs > MAX_LOGPROB)
    if bad.any():
        first = np.flatnonzero(bad)[0]
        row, position = _locate(column, token_of_entry[first])
        fail(f"log-prob {logprobs[first]} at response token {position} is not a log-probability", TEACHER_TOPK, row)


def _check_policy_mask(column: pa.ListArray, table: pa.Table, fail) -> None:
    """One flag per response token, and at least one policy token per row: a row the environment wrote alone has
    nothing to train on."""
    _check_length(column, table, POLICY_MASK, fail)
    flags = pc.list_flatten(column)
    if flags.null_count:
        row, position = _locate(column, _first(pc.is_null(flags)))
        fail(f"is null at response token {position}", POLICY_MASK, row)
    flags = flags.to_numpy(zero_copy_only=False)
    per_row = np.bincount(pc.list_parent_indices(column).to_numpy(), weights=flags, minlength=len(column))
    if (per_row == 0).any():
        fail("has no true value (a row with no token the policy sampled has nothing to train on)", POLICY_MASK,
             np.flatnonzero(per_row == 0)[0])


def _check_length(column: pa.ListArray, table: pa.Table, name: str, fail) -> None:
    """A per-token column has one value per response token."""
    if RESPONSE_IDS in table.column_names:
        expected = pc.list_value_length(table.column(RESPONSE_IDS).combine_chunks()).to_numpy(zero_copy_only=False)
        actual = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        if (expected != actual).any():
            row = np.flatnonzero(expected != actual)[0]
            fail(f"has {actual[row]} values but response_ids has {expected[row]} tokens", name, row)


def _locate(column: pa.ListArray, token: int) -> tuple[int, int]:
    """Row and response-token position of a per-token column's `token`-th value, counted over all rows."""
    parents = pc.list_parent_indices(column).to_numpy()
    row = parents[token]
    return row, token - np.flatnonzero(parents == row)[0]


def _first(mask: pa.Array) -> int:
    return int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0])


def append_column(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray | list,
                  type: pa.DataType | None = None) -> pa.Table:
    """Add (or replace) a column, typed as the schema says (or as `type` says, for a column of the caller's)."""
    wanted = type or COLUMN_TYPES[name]
    array = values.cast(wanted) if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, type=wanted)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), pa.field(name, wanted), array)
    return table.append_column(pa.field(name, wanted), array)


def policy_tokens(table: pa.Table) -> np.ndarray:
    """One bool per response token of the batch, rows one after another: whether the policy sampled it (all true
    without a policy_mask column)."""
    if POLICY_MASK in table.column_names:
        return pc.list_flatten(table.column(POLICY_MASK)).to_numpy(zero_copy_only=False).astype(bool)
    return np.ones(int(pc.sum(pc.list_value_length(table.column(RESPONSE_IDS))).as_py() or 0), dtype=bool)


def blank_environment_tokens(table: pa.Table, values: list[list], blank) -> list[list]:
    """Per-response-token values of `table`'s rows with `blank` at the environment's tokens: what the schema keeps
    there (log-prob 0.0, an empty top-k) where an engine scored every token of a multi-turn row."""
    if POLICY_MASK not in table.column_names:
        return values
    return [[value if by_policy else blank for value, by_policy in zip(row, mask, strict=True)]
            for row, mask in zip(values, table.column(POLICY_MASK).to_pylist(), strict=True)]


def response_token_count(table: pa.Table) -> int:
    """Number of response tokens the policy sampled in a batch (environment tokens are context, not counted):
    PEAR's and GRPO's token-mean divisor."""
    return int(policy_tokens(table).sum())
