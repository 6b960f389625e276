"""reasoning-gym tasks: procedural prompts from `reasoning_gym.create_dataset` and the dataset's own scorer.

Splits. reasoning-gym builds item `i` of a dataset with seed `s` from `Random(s + i)`, so two datasets whose seeds
differ by less than their size share almost all their items (seed 1 is seed 0 shifted by one). The train split
is items 0, 1, 2, ... of seed `seed`; the eval split is items of seed `seed + EVAL_SEED_OFFSET` (index streams
that never meet for any practical num_train), de-duplicated, `num_eval` of them. Small argument ranges make
equal questions likely anyway (1-digit sums: about 1,300 distinct questions), so train also skips every question
that is in the eval split: no eval prompt ever equals a train prompt. Train prompts may repeat; eval ones do not.

Scoring. Each row's metadata JSON holds the dataset name, its args and the whole reasoning-gym entry (question,
answer, metadata), so a verifier in another process rebuilds the dataset (cached per process) and calls its
`score_answer(extracted_answer, entry)`. Datasets without their own scorer inherit reasoning-gym's fallback,
which gives partial credit `len(gold)/len(answer)` to any answer containing the gold one as a substring (`17` gets
0.5 against `7`, `-7` too); on an already-extracted answer that only rewards wrong numbers, so for those datasets
the reward is strict equality with the gold answer instead. Scorers of their own are used as they are (e.g.
spell_backward's case-insensitive, per-letter partial credit).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from pear_ray.data import schema
from pear_ray.tasks.answers import clamp_reward, extract_answer, is_number, score_metadata
from pear_ray.tasks.base import Split, check_split, load_metadata, prompt_table, to_json
from pear_ray.tasks.registry import register_kind, register_verifier

if TYPE_CHECKING:
    from pear_ray.config import DataConfig, TaskConfig

log = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 1_000_003
# Tries per wanted row before a split is declared impossible (the question space is too small).
MAX_TRIES_FACTOR = 20

# Argument presets small enough for the tiny demo models to learn (the jobs set `task.args` to these).
TINY_ARGS: dict[str, dict[str, Any]] = {
    "basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
    "letter_counting": {"min_words": 1, "max_words": 2},
    "spell_backward": {"min_word_len": 3, "max_word_len": 4},
}


@functools.lru_cache(maxsize=64)
def _scoring_dataset(name: str, args_json: str):
    """One dataset instance per (name, args) and process: what `score_answer` is called on."""
    import json

    import reasoning_gym

    return reasoning_gym.create_dataset(name, seed=0, size=1, **json.loads(args_json))


def _has_own_scorer(dataset) -> bool:
    from reasoning_gym.dataset import ProceduralDataset

    return type(dataset).score_answer is not ProceduralDataset.score_answer


def _build_scoring_datasets(metadatas: list[dict[str, Any]]) -> None:
    """Build the datasets the rows name (cached per process) before the verifier worker forks its scorers."""
    for name, args_json in {(meta["dataset"], to_json(meta.get("args") or {})) for meta in metadatas
                            if isinstance(meta.get("dataset"), str)}:
        _scoring_dataset(name, args_json)


@register_verifier("reasoning_gym", warm_up=_build_scoring_datasets)
def score_reasoning_gym(response: str, answer: str, meta: dict[str, Any]) -> float:
    """Reward of one response for a row whose metadata names a reasoning-gym dataset (see module docstring)."""
    name = meta["dataset"]
    entry = meta.get("entry") or {"question": meta.get("question", ""), "answer": answer, "metadata": {}}
    gold = str(entry.get("answer", answer))
    dataset = _scoring_dataset(name, to_json(meta.get("args") or {}))
    predicted = extract_answer(response, numeric=is_number(gold))
    if not _has_own_scorer(dataset):
        return 1.0 if predicted and predicted == gold.strip() else 0.0
    return clamp_reward(dataset.score_answer(predicted, entry))


@dataclass
class ReasoningGymTask:
    """A reasoning-gym dataset as a task. `verifier`: `task` (the dataset's scorer), `exact` or `math`."""

    name: str = "basic_arithmetic"
    args: dict[str, Any] = field(default_factory=dict)
    num_train: int = 256
    num_eval: int = 64
    seed: int = 0
    verifier: Literal["task", "exact", "math"] = "task"
    eval_path: str | None = None  # held-out prompts from a file (data.eval) instead of generated ones
    _eval: list[dict[str, Any]] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        import reasoning_gym.factory

        if self.name not in reasoning_gym.factory.DATASETS:
            known = ", ".join(sorted(reasoning_gym.factory.DATASETS))
            raise ValueError(f"task.name: reasoning-gym has no dataset {self.name!r} (known: {known})")
        reserved = {"seed", "size"} & set(self.args)
        if reserved:
            raise ValueError(f"task.args: {sorted(reserved)} are set by pear_ray (task.split_seed, num_train/num_eval)")
        try:
            self._dataset(self.seed, 1)
        except (TypeError, AssertionError, ValueError) as error:
            raise ValueError(f"task.args {self.args} do not configure reasoning-gym {self.name!r}: {error}") from None

    def _dataset(self, seed: int, size: int):
        import reasoning_gym

        return reasoning_gym.create_dataset(self.name, seed=seed, size=size, **self.args)

    @property
    def _verifier_kind(self) -> str:
        return "reasoning_gym" if self.verifier == "task" else self.verifier

    def _row(self, split: str, seed: int, index: int, entry: dict[str, Any]) -> dict[str, Any]:
        question = str(entry["question"])
        metadata = {
            "verifier": self._verifier_kind,
            "dataset": self.name,
            "args": self.args,
            "seed": seed,
            "index": index,
            "entry": entry,
        }
        return {"id": f"{self.name}-{split}-{index}", "prompt": question, "answer": str(entry["answer"]),
                "metadata": metadata}

    def _eval_rows(self) -> list[dict[str, Any]]:
        if self._eval is not None:
            return self._eval
        if self.eval_path:
            rows = self._rows_from_file(self.eval_path)[: self.num_eval]
        else:
            seed = self.seed + EVAL_SEED_OFFSET
            tries = max(MAX_TRIES_FACTOR * self.num_eval, 1000)
            dataset = self._dataset(seed, tries)
            rows, seen = [], set()
            for index in range(tries):
                entry = dataset[index]
                if entry["question"] in seen:
                    continue
                seen.add(entry["question"])
                rows.append(self._row("eval", seed, index, entry))
                if len(rows) == self.num_eval:
                    break
            else:
                raise ValueError(f"reasoning-gym {self.name!r} with args {self.args} gave only {len(rows)} distinct "
                                 f"questions in {tries} tries; lower task.num_eval or widen task.args")
        self._eval = rows
        return rows

    def _rows_from_file(self, path: str) -> list[dict[str, Any]]:
        from pear_ray.data.io import DataError, read_table

        table = read_table(path)
        missing = [c for c in (schema.PROMPT, schema.ANSWER) if c not in table.column_names]
        if missing:
            raise DataError(f"{path}: eval prompts need columns {missing} (the file has {table.column_names})")
        prompts = table.column(schema.PROMPT).to_pylist()
        answers = table.column(schema.ANSWER).to_pylist()
        metas = (table.column(schema.METADATA).to_pylist() if schema.METADATA in table.column_names
                 else [None] * table.num_rows)
        rows = []
        for index, (prompt, answer, meta) in enumerate(zip(prompts, answers, metas)):
            if not prompt or answer is None:
                raise DataError(f"{path}, row {index + 1}: empty prompt or missing answer")
            metadata = load_metadata(meta) or {
                "verifier": self._verifier_kind, "dataset": self.name, "args": self.args,
                "entry": {"question": prompt, "answer": answer, "metadata": {}},
            }
            rows.append({"id": f"{self.name}-eval-{index}", "prompt": prompt, "answer": answer, "metadata": metadata})
        return rows

    def prompts(self, split: Split, n: int | None = None) -> pa.Table:
        """`n` prompts of a split (default num_train / num_eval); eval asks for at most num_eval."""
        check_split(split)
        held_out = self._eval_rows()
        if split == "eval":
            n = len(held_out) if n is None else n
            if n > len(held_out):
                raise ValueError(f"asked for {n} eval prompts; the held-out split has {len(held_out)} "
                                 f"(raise task.num_eval)")
            rows = held_out[:n]
        else:
            n = self.num_train if n is None else n
            excluded = {row["prompt"] for row in held_out}
            tries = max(MAX_TRIES_FACTOR * n, 1000)
            dataset = self._dataset(self.seed, tries)
            rows = []
            for index in range(tries):
                if len(rows) == n:
                    break
                entry = dataset[index]
                if entry["question"] not in excluded:
                    rows.append(self._row("train", self.seed, index, entry))
            if len(rows) < n:
                raise ValueError(f"reasoning-gym {self.name!r} with args {self.args}: only {len(rows)} train "
                                 f"questions outside the eval split in {tries} tries")
        return prompt_table([r["id"] for r in rows], [r["prompt"] for r in rows], [r["answer"] for r in rows],
                            [r["metadata"] for r in rows], self.name)

    def score(self, response: str, answer: str, metadata: str | None = None) -> float:
        meta = load_metadata(metadata)
        meta.setdefault("verifier", self._verifier_kind)
        meta.setdefault("dataset", self.name)
        meta.setdefault("args", self.args)
        return score_metadata(response, answer, meta)


@register_kind("reasoning_gym")
def build_reasoning_gym_task(task_config: TaskConfig, data_config: DataConfig, seed: int) -> ReasoningGymTask:
    return ReasoningGymTask(name=task_config.name, args=dict(task_config.args), num_train=task_config.num_train,
                            num_eval=task_config.num_eval, seed=seed, verifier=task_config.verifier,
                            eval_path=data_config.eval)
