"""User data as a task: prompt + answer rows from a Parquet/JSONL file or a `datasets` dataset (a save_to_disk
folder or a Hub dataset id; task.split, task.columns), checked by exact match or math-verify.

Splits: with a separate eval file (`data.eval`) that file's first num_eval rows are the eval split and the train
split is every row of the task file whose prompt is not among them. Without one, `num_eval` distinct prompts of
the task file, drawn with task.split_seed, are held out for eval and the rest is train. Either way no eval prompt
equals a train prompt. Train returns `n` rows in file order, cycling when the file has fewer; eval returns at most
the held-out rows.

Verifiers (`task.verifier`): `exact` (also what `task` means here): the extracted answer equals the gold one after
collapsing whitespace, case-insensitive when `task.args.ignore_case` is true; `math`: math-verify equivalence
(`0.5` == `\\frac{1}{2}`). See `pear_ray.tasks.answers` for answer extraction.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from pear_ray.data import schema
from pear_ray.data.io import DEFAULT_SPLIT, DataError, read_table
from pear_ray.tasks.answers import score_metadata
from pear_ray.tasks.base import Split, check_split, load_metadata, prompt_table
from pear_ray.tasks.registry import register_kind

if TYPE_CHECKING:
    from pear_ray.config import DataConfig, TaskConfig

log = logging.getLogger(__name__)

USER_ARGS = ("ignore_case",)


def read_prompt_answer_file(path: str, split: str = DEFAULT_SPLIT,
                            columns: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Rows {prompt, answer, row} of a user file; refuses missing columns and empty cells, naming file and row."""
    table = read_table(path, split=split, columns=columns)
    missing = [c for c in (schema.PROMPT, schema.ANSWER) if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: a user task needs columns 'prompt' and 'answer'; missing {missing} "
                        f"(the file has {table.column_names})")
    rows = []
    prompts = table.column(schema.PROMPT).to_pylist()
    answers = table.column(schema.ANSWER).to_pylist()
    for index, (prompt, answer) in enumerate(zip(prompts, answers)):
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{path}, row {index + 1}, column 'prompt': expected non-empty text, got {prompt!r}")
        if answer is None or not str(answer).strip():
            raise DataError(f"{path}, row {index + 1}, column 'answer': expected an answer, got {answer!r}")
        rows.append({"prompt": prompt, "answer": str(answer), "row": index, "source": str(path)})
    return rows


@dataclass
class UserTask:
    """Prompt/answer rows from the user's file(s); files are read on first use, so scoring never reads them."""

    name: str = "user"
    path: str | None = None  # prompt + answer file (the train split, and the eval split without eval_path)
    split: str = DEFAULT_SPLIT  # of a `datasets` path
    columns: dict[str, str] = field(default_factory=dict)  # path's columns under the schema's names
    eval_path: str | None = None  # held-out prompt + answer file (data.eval)
    verifier: Literal["exact", "math"] = "exact"
    ignore_case: bool = False
    num_train: int = 256
    num_eval: int = 64
    seed: int = 0
    _splits: dict[str, list[dict[str, Any]]] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.verifier not in ("exact", "math"):
            raise ValueError(f"task.verifier for user data must be 'exact' or 'math', got {self.verifier!r}")

    def _load_splits(self) -> dict[str, list[dict[str, Any]]]:
        if self._splits is not None:
            return self._splits
        if self.path is None and self.eval_path is None:
            raise ValueError("a user task needs its data file: set task.path (prompt + answer, Parquet or JSONL)")
        rows = read_prompt_answer_file(self.path, self.split, self.columns) if self.path else []
        if self.eval_path:
            held_out = read_prompt_answer_file(self.eval_path)[: self.num_eval]
            excluded = {row["prompt"] for row in held_out}
            train = [row for row in rows if row["prompt"] not in excluded]
        else:
            distinct = list(dict.fromkeys(row["prompt"] for row in rows))
            if len(distinct) <= self.num_eval:
                raise DataError(f"{self.path}: {len(distinct)} distinct prompts cannot give {self.num_eval} held-out "
                                "eval prompts and a train split; lower task.num_eval or set data.eval")
            random.Random(self.seed).shuffle(distinct)
            chosen = set(distinct[: self.num_eval])
            held_out, seen, train = [], set(), []
            for row in rows:
                if row["prompt"] not in chosen:
                    train.append(row)
                elif row["prompt"] not in seen:
                    seen.add(row["prompt"])
                    held_out.append(row)
        self._splits = {"train": train, "eval": held_out}
        return self._splits

    def _metadata(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"verifier": self.verifier, "ignore_case": self.ignore_case, "row": row["row"], "source": row["source"]}

    def prompts(self, split: Split, n: int | None = None) -> pa.Table:
        check_split(split)
        pool = self._load_splits()[split]
        if split == "train":
            n = self.num_train if n is None else n
            if not pool:
                raise DataError(f"{self.path}: no train rows left after holding out the eval prompts")
            if n > len(pool):
                log.info("user task %s: %d train prompts asked, %d in the file; cycling", self.name, n, len(pool))
            rows = [pool[k % len(pool)] for k in range(n)]
        else:
            n = self.num_eval if n is None else n
            rows = pool[:n]
        return prompt_table([f"{self.name}-{split}-{k}" for k in range(len(rows))], [r["prompt"] for r in rows],
                            [r["answer"] for r in rows], [self._metadata(r) for r in rows], self.name)

    def score(self, response: str, answer: str, metadata: str | None = None) -> float:
        meta = load_metadata(metadata)
        meta.setdefault("verifier", self.verifier)
        meta.setdefault("ignore_case", self.ignore_case)
        return score_metadata(response, answer, meta)


@register_kind("user")
def build_user_task(task_config: TaskConfig, data_config: DataConfig, seed: int) -> UserTask:
    args = dict(task_config.args)
    unknown = sorted(set(args) - set(USER_ARGS))
    if unknown:
        raise ValueError(f"task.args of a user task accepts {list(USER_ARGS)}; unknown {unknown}")
    # `name` defaults to a reasoning-gym dataset name; a user task that does not set one is called "user".
    name = task_config.name if "name" in task_config.model_fields_set else "user"
    return UserTask(name=name, path=task_config.path, split=task_config.split, columns=task_config.columns,
                    eval_path=data_config.eval,
                    verifier="exact" if task_config.verifier == "task" else task_config.verifier,
                    ignore_case=bool(args.get("ignore_case", False)), num_train=task_config.num_train,
                    num_eval=task_config.num_eval, seed=seed)
