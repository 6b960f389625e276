"""Rewards for a table of responses, computed apart from the driver, with a per-sample timeout.

`score_rows` cuts the rows into chunks and scores each chunk in one Ray task (a fraction of a CPU each). Inside
the task, the chunk's samples are scored one after the other in a forked child process, and the Ray task waits
for each sample's result for at most `verifier_timeout_s`:
- a verifier that raises (or returns something that is not a finite number) gives reward 0 and counts as an error;
- a verifier still running at the deadline gives reward 0 and counts as a timeout: the child is killed and a new
  one scores the rest of the chunk;
- a child that dies (a crash in native code) counts as an error for the sample it was on.
So a bad sample can neither crash nor hang the job, and the results of the good ones are kept.

The child process and its deadline are `forked.call_in_child`'s (why a process, not a thread or a signal: see
there). math-verify's own signal timeouts are disabled by our calls (`parsing_timeout=None`, `timeout_seconds=None`)
since the child enforces the deadline. What the verifiers register as warm-ups (math-verify's imports, reasoning-gym
datasets), or the job's custom reward, is loaded in the Ray worker first, so children start with it loaded and worker
reuse amortises the warm-up.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import pyarrow as pa
import ray

from pear_ray.data import schema
from pear_ray.forked import call_in_child
from pear_ray.plugins import load_callable
from pear_ray.tasks.base import Task, load_metadata
from pear_ray.tasks.build import CustomReward, make_task
from pear_ray.tasks.registry import WARM_UPS

log = logging.getLogger(__name__)

DEFAULT_CHUNK_ROWS = 64
DEFAULT_NUM_CPUS = 0.25

Row = tuple[str, str, str | None]  # response text, gold answer, metadata JSON


def _warm(task: Task, rows: Sequence[Row]) -> None:
    """Load what scoring will use before forking, so each child starts with it instead of spending a sample's
    timeout on imports: the job's custom reward, or else the warm-ups registered by the verifiers the rows name."""
    if isinstance(task, CustomReward):
        _quietly(load_callable, task.reward)
        return
    for name, metadatas in _metadata_by_verifier(rows).items():
        if name in WARM_UPS:
            _quietly(WARM_UPS[name], metadatas)


def _quietly(warm_up, *args) -> None:
    """Run a warm-up; a real problem shows up in the child, as an error of the rows it concerns."""
    try:
        warm_up(*args)
    except Exception:  # noqa: BLE001
        pass


def _metadata_by_verifier(rows: Sequence[Row]) -> dict[str, list[dict]]:
    """The rows' metadata grouped by the verifier it names; metadata that does not parse is the child's to report."""
    grouped: dict[str, list[dict]] = {}
    for _, _, metadata in rows:
        try:
            meta = load_metadata(metadata)
        except ValueError:
            continue
        if isinstance(meta.get("verifier"), str):
            grouped.setdefault(meta["verifier"], []).append(meta)
    return grouped


def score_chunk(task: Task, rows: Sequence[Row], timeout_s: float) -> tuple[list[float], int, int, list[str]]:
    """(rewards, errors, timeouts, first error messages) of one chunk; see the module docstring. No Ray here."""
    _warm(task, rows)
    rewards: list[float] = []
    errors = timeouts = 0
    messages: list[str] = []
    for outcome in call_in_child(lambda row: float(task.score(*row)), rows, timeout_s):
        if outcome.status == "ok" and math.isfinite(outcome.value):
            rewards.append(min(1.0, max(0.0, outcome.value)))
            continue
        rewards.append(0.0)
        if outcome.status == "timeout":
            timeouts += 1
            continue
        errors += 1
        messages.append(outcome.message if outcome.status == "error" else f"verifier returned {outcome.value}")
    return rewards, errors, timeouts, messages[:3]


_score_chunk_remote = ray.remote(score_chunk)


def score_rows(
    table: pa.Table,
    task_config,
    *,
    task: Task | None = None,
    response_column: str = schema.RESPONSE,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    num_cpus: float = DEFAULT_NUM_CPUS,
) -> tuple[list[float], dict[str, int]]:
    """Rewards in [0, 1] for every row of `table` (columns `response` text, `answer`, optional `metadata`), in
    row order, and the failure counts `{"errors": n, "timeouts": m}`.

    `task` defaults to `make_task(task_config)` (which reads no data); the per-sample timeout is
    `task_config.verifier_timeout_s`. One Ray task per `chunk_rows` rows, each asking for `num_cpus` CPUs, so
    scoring fits beside actors that hold most of the CPUs. A null response scores as the empty text.
    """
    failures = {"errors": 0, "timeouts": 0}
    if table.num_rows == 0:
        return [], failures
    missing = [c for c in (response_column, schema.ANSWER) if c not in table.column_names]
    if missing:
        raise ValueError(f"score_rows needs columns {missing} (the table has {table.column_names})")
    if task is None:
        task = make_task(task_config)
    responses = [r or "" for r in table.column(response_column).to_pylist()]
    answers = [str(a) if a is not None else "" for a in table.column(schema.ANSWER).to_pylist()]
    metadata = (table.column(schema.METADATA).to_pylist() if schema.METADATA in table.column_names
                else [None] * table.num_rows)
    rows = list(zip(responses, answers, metadata))

    if not ray.is_initialized():
        from pear_ray.runtime import init_ray

        init_ray()
    task_ref = ray.put(task)
    timeout_s = float(task_config.verifier_timeout_s)
    refs = [
        _score_chunk_remote.options(num_cpus=num_cpus).remote(task_ref, rows[start:start + chunk_rows], timeout_s)
        for start in range(0, len(rows), chunk_rows)
    ]
    rewards: list[float] = []
    messages: list[str] = []
    for chunk_rewards, errors, timeouts, chunk_messages in ray.get(refs):
        rewards.extend(chunk_rewards)
        failures["errors"] += errors
        failures["timeouts"] += timeouts
        messages.extend(chunk_messages)
    if failures["errors"] or failures["timeouts"]:
        log.warning("verifiers: %d errors, %d timeouts (> %.1fs) in %d rows; first errors: %s", failures["errors"],
                    failures["timeouts"], timeout_s, len(rows), messages[:3])
    return rewards, failures
