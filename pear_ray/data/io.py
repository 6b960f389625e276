"""Reading datasets (Parquet, JSONL, `datasets` folders and Hub ids) and the one tokenization every stage shares.

A dataset row carries a prompt and a response either as text (`prompt`, `response`) or as token ids of
the student's tokenizer (`prompt_ids`, `response_ids`), optional `behavior_logprobs`, and task metadata.
"""

from __future__ import annotations

import json
import logging
import reprlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pear_ray import atomic
from pear_ray.data import schema

log = logging.getLogger(__name__)


# The split read from a `datasets` source unless the config names one.
DEFAULT_SPLIT = "train"
FILE_SUFFIXES = (".parquet", ".jsonl", ".json")


class DataError(ValueError):
    """A data file that cannot be read; names the file and the line or column."""


def checked_columns(columns: dict[str, str]) -> dict[str, str]:
    """A column mapping {schema name: the data's column}: refuses names the schema does not know, and one data
    column given two names (the config's validator, so a typo fails at load time)."""
    unknown = sorted(set(columns) - set(schema.COLUMN_TYPES))
    if unknown:
        raise ValueError(f"the column mapping renames to {unknown}, which the schema does not know; known: "
                         f"{', '.join(schema.COLUMN_TYPES)}")
    values = list(columns.values())
    doubled = sorted({v for v in values if values.count(v) > 1})
    if doubled:
        raise ValueError(f"the column mapping gives the data's column(s) {doubled} more than one name")
    return columns


def read_table(path: str | Path, *, split: str = DEFAULT_SPLIT, columns: dict[str, str] | None = None) -> pa.Table:
    """Read a Parquet or JSONL file, or `split` of a `datasets` dataset (a save_to_disk folder, whole when it holds
    one split, or a Hub dataset id), into an Arrow table; rename its columns by `columns` ({schema name: the data's
    column}) and conform them to the schema's types, so every source meets the same validation."""
    source = str(path)
    local = Path(path).expanduser()
    if local.is_dir():
        table = _read_dataset(local, split, source, saved=True)
    elif local.is_file() and local.suffix == ".parquet":
        table = _read_parquet(local)
    elif local.is_file() and local.suffix in (".jsonl", ".json"):
        table = _read_jsonl(local)
    elif local.is_file():
        raise DataError(f"{path}: unknown format {local.suffix!r} (expected .parquet, .jsonl or a datasets folder)")
    elif local.suffix in FILE_SUFFIXES:
        raise DataError(f"{path}: no such file")
    else:
        from pear_ray.hub import SourceNotFound, hub_snapshot

        try:
            snapshot = hub_snapshot(source, what=f"{source}: no such file or folder, and as a Hub dataset id",
                                    repo_type="dataset")
        except SourceNotFound as error:
            raise DataError(str(error)) from None
        table = _read_dataset(snapshot, split, source, saved=False)
    return schema.conform(_renamed(table, columns or {}, source), source=source)


def _read_dataset(folder: Path, split: str, source: str, *, saved: bool) -> pa.Table:
    """One split of a save_to_disk folder (saved) or of a Hub dataset's snapshot (its data files), as Arrow."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder)) if saved else datasets.load_dataset(str(folder))
    except FileNotFoundError as error:
        raise DataError(f"{source}: a folder, but not a dataset saved with save_to_disk ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{source}: no split {split!r} (the dataset has {', '.join(loaded)})")
        loaded = loaded[split]
    if loaded.num_rows == 0:
        raise DataError(f"{source}: no rows")
    return loaded.with_format("arrow")[:]


def _renamed(table: pa.Table, columns: dict[str, str], source: str) -> pa.Table:
    """The table with the mapped columns under the schema's names; refuses a mapped column the data lacks, and a
    name the data already uses for another column."""
    missing = sorted(c for c in columns.values() if c not in table.column_names)
    if missing:
        raise DataError(f"{source}: the column mapping names column(s) {missing} the data lacks "
                        f"(it has {table.column_names})")
    names = {theirs: ours for ours, theirs in columns.items()}
    taken = sorted(ours for ours in columns if ours in table.column_names and ours not in names)
    if taken:
        raise DataError(f"{source}: the column mapping renames onto {taken}, which the data already has")
    return table.rename_columns([names.get(name, name) for name in table.column_names])


def _read_parquet(path: Path) -> pa.Table:
    """A Parquet file, refused like an empty JSONL one when it holds no rows, and named when it cannot be read."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: no rows")
    return table


def _read_jsonl(path: Path) -> pa.Table:
    rows, lines = [], []
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}, line {number}: not UTF-8 text (byte {raw[error.start]:#04x} at column "
                                f"{error.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {number}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(_ids_and_answers_as_text(row))
            lines.append(number)
    if not rows:
        raise DataError(f"{path}: no rows")
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        raise _misfit(path, rows, lines) from None


def _ids_and_answers_as_text(row: dict) -> dict:
    """JSON answers and ids are often numbers on some lines and strings on others: they become text. (A prompt or
    response that is not text is a mistake, not converted: `_misfit` or the schema refuses it.)"""
    for name in (schema.ID, schema.ANSWER):
        if row.get(name) is not None and not isinstance(row[name], str):
            row[name] = json.dumps(row[name]) if isinstance(row[name], (dict, list)) else str(row[name])
    return row


def _misfit(path: Path, rows: list[dict], lines: list[int]) -> DataError:
    """Why Arrow cannot make one table of the rows: the first line whose value does not fit its column, by the
    schema's type for a column the schema knows (so a wrong first line is the one named), else by the type of the
    lines above it. Converts value by value, so only for the error."""
    columns = {name: [row.get(name) for row in rows] for name in rows[0]}  # the columns Table.from_pylist makes
    name = next(name for name, values in columns.items() if not _converts(values))
    values, wanted = columns[name], schema.COLUMN_TYPES.get(name)
    misfits = (index for index, value in enumerate(values) if wanted is not None and not _converts([value], wanted))
    index = next(misfits, None)
    if index is not None:
        expected = schema.type_name(wanted)
    else:
        index = _first_failing_prefix(values) - 1
        expected = f"{pa.array(values[:index]).type}, as on the lines above" if index else "values of one type"
    value = values[index]
    return DataError(f"{path}, line {lines[index]}, column {name!r}: expected {expected}, got {type(value).__name__} "
                     f"{reprlib.repr(value)}")


def _converts(values: list, type: pa.DataType | None = None) -> bool:
    try:
        pa.array(values, type=type)
        return True
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return False


def _first_failing_prefix(values: list) -> int:
    """The length of the shortest prefix of `values` Arrow cannot convert, by bisection (a prefix that fails stays
    failing)."""
    works, fails = 0, len(values)
    while fails - works > 1:
        middle = (works + fails) // 2
        works, fails = (middle, fails) if _converts(values[:middle]) else (works, middle)
    return fails


def write_table(table: pa.Table, path: str | Path, **options) -> None:
    """Write a stage's output as Parquet (pyarrow's write_table `options`), atomically, so a crash never leaves half
    a file behind."""
    with atomic.replacing(path) as partial:
        pq.write_table(table, partial, **options)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids: through the chat template (as a user turn, ready for the reply) where the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)
    return tokenizer.encode(text, add_special_tokens=True)


def encode_response(tokenizer, text: str) -> list[int]:
    """Response ids end with the end-of-sequence token, so SFT teaches the model when to stop."""
    return tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]


def tokenize(table: pa.Table, tokenizer, *, max_prompt_tokens: int, max_response_tokens: int,
             source: str = "batch") -> pa.Table:
    """Add `prompt_ids`/`response_ids` from text columns where missing; truncate to the configured lengths.

    Prompts keep their end (the question and the generation prompt), responses keep their start.
    """
    if schema.PROMPT_IDS not in table.column_names:
        table = _encode_column(table, schema.PROMPT, schema.PROMPT_IDS, lambda t: encode_prompt(tokenizer, t), source)
    if schema.RESPONSE_IDS not in table.column_names and schema.RESPONSE in table.column_names:
        table = _encode_column(table, schema.RESPONSE, schema.RESPONSE_IDS, lambda t: encode_response(tokenizer, t),
                               source)
    limits = {schema.PROMPT_IDS: max_prompt_tokens, schema.RESPONSE_IDS: max_response_tokens}
    for name, limit in limits.items():
        if name not in table.column_names:
            continue
        rows = table.column(name).to_pylist()
        long_rows = sum(len(ids) > limit for ids in rows)
        if long_rows:
            log.warning("truncating %d of %d rows of %s to %d tokens", long_rows, len(rows), name, limit)
            kept = [ids[-limit:] if name == schema.PROMPT_IDS else ids[:limit] for ids in rows]
            table = schema.append_column(table, name, kept)
            if name == schema.RESPONSE_IDS:
                table = _truncate_per_token(table, limit)
    return table


def _encode_column(table: pa.Table, text_column: str, ids_column: str, encode, source: str) -> pa.Table:
    if text_column not in table.column_names:
        raise DataError(f"{source}: column {text_column!r} or {ids_column!r} is required (the data has "
                        f"{table.column_names})")
    texts = table.column(text_column).to_pylist()
    for row, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            raise DataError(f"{source}, row {row + 1}, column {text_column!r}: expected non-empty text, got {text!r}")
    return schema.append_column(table, ids_column, [encode(text) for text in texts])


def _truncate_per_token(table: pa.Table, limit: int) -> pa.Table:
    for name in schema.RESPONSE_ALIGNED_COLUMNS:
        if name in table.column_names:
            table = schema.append_column(table, name, [v[:limit] for v in table.column(name).to_pylist()])
    return table


def with_ids(table: pa.Table) -> pa.Table:
    """Give every row a stable `id` (its row number) when the data has none, so outputs can be joined back."""
    if schema.ID in table.column_names:
        return table
    return schema.append_column(table, schema.ID, [str(i) for i in range(table.num_rows)])


def load_sft_data(path: str | Path, tokenizer, *, max_prompt_tokens: int, max_response_tokens: int,
                  split: str = DEFAULT_SPLIT, columns: dict[str, str] | None = None) -> pa.Table:
    """Read, tokenize and validate an SFT dataset: the single way every stage gets its training rows."""
    table = read_table(path, split=split, columns=columns)
    table = tokenize(table, tokenizer, max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_response_tokens,
                     source=str(path))
    return schema.validate(with_ids(table), vocab_size=len(tokenizer), source=str(path))
