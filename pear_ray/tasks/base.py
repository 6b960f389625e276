"""What a task is: a prompt source plus a verifier, and the prompt table every task returns.

A task is a prompt source plus a verifier returning a reward in [0, 1]:
- `prompts(split, n)` gives an Arrow table with columns id, prompt, answer, metadata (JSON text), task;
- `score(response, answer, metadata_json)` gives the reward of one response text.

Rewards are computed in separate Ray tasks on rows read back from Parquet, so everything a verifier needs is in
the row: the `metadata` JSON always carries a `verifier` key (`reasoning_gym`, `exact`, `math`: a name in the
registry, pear_ray.tasks.registry) plus that verifier's inputs, and `score_metadata` scores any row from its own
columns alone (tasks/answers.py, which also holds answer extraction and the generic verifiers `exact` and `math`).

Optionally a task also names the styles its responses come in (`StyledTask`: the addition task's worked trace or bare
answer); eval and RL then report the share of samples in each. A task without `styles` (reasoning-gym and user
tasks) reports nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import pyarrow as pa

from pear_ray.data import schema

Split = Literal["train", "eval"]
SPLITS = ("train", "eval")

# Columns of a prompts() table, in order.
PROMPT_COLUMNS = (schema.ID, schema.PROMPT, schema.ANSWER, schema.METADATA, schema.TASK)


@runtime_checkable
class Task(Protocol):
    """A prompt source plus a verifier. Implementations are small picklable dataclasses."""

    name: str

    def prompts(self, split: Split, n: int | None = None) -> pa.Table:
        """`n` rows (default: the config's num_train / num_eval) of id, prompt, answer, metadata, task.

        Deterministic for a seed; no eval prompt equals a train prompt.
        """
        ...

    def score(self, response: str, answer: str, metadata: str | None) -> float:
        """Reward in [0, 1] of one response text (decoding ids to text is the caller's business)."""
        ...


@runtime_checkable
class StyledTask(Protocol):
    """Optional beside `Task`: a task whose responses come in named styles, so a run can show which one the student
    writes (eval's `style_<name>` counts per prompt and `share_<name>` metrics, RL's `share_<name>` per step)."""

    styles: tuple[str, ...]  # the style names, e.g. ("trace", "bare"); the first is the one the report shows

    def style(self, response: str) -> str | None:
        """The style (one of `styles`) one response text is written in; None when it is in none of them."""
        ...


def task_styles(task: Task) -> tuple[str, ...]:
    """The styles `task` classifies responses into; () for a task without (nothing is then reported)."""
    return tuple(getattr(task, "styles", ()))


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def prompt_table(ids: Sequence[str], prompts: Sequence[str], answers: Sequence[str],
                 metadata: Sequence[dict[str, Any]], task: str) -> pa.Table:
    """The prompts() table, typed as the schema says; metadata dicts are stored as JSON text."""
    columns = {
        schema.ID: list(ids),
        schema.PROMPT: list(prompts),
        schema.ANSWER: [str(a) for a in answers],
        schema.METADATA: [to_json(m) for m in metadata],
        schema.TASK: [task] * len(ids),
    }
    return pa.table({name: pa.array(values, type=schema.COLUMN_TYPES[name]) for name, values in columns.items()})


def to_json(value: Any) -> str:
    """JSON text of task metadata; tuples become lists, sets sorted lists, other odd types their str()."""

    def fallback(obj: Any) -> Any:
        if isinstance(obj, (set, frozenset)):
            return sorted(obj, key=repr)
        if hasattr(obj, "item"):  # numpy scalars
            return obj.item()
        if hasattr(obj, "tolist"):  # numpy arrays
            return obj.tolist()
        return str(obj)

    return json.dumps(value, default=fallback, sort_keys=True)


def load_metadata(metadata: str | dict | None) -> dict[str, Any]:
    if metadata is None or metadata == "":
        return {}
    if isinstance(metadata, dict):
        return metadata
    value = json.loads(metadata)
    if not isinstance(value, dict):
        raise ValueError(f"task metadata must be a JSON object, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------- answer extraction
