"""Verifiable tasks: a prompt source plus a verifier returning a reward in [0, 1].

- `make_task(task_config, data_config, seed=task_config.split_seed)` builds the job's task;
- `task.prompts("train" | "eval", n)` gives rows id, prompt, answer, metadata (JSON text), task;
- `task.score(response_text, answer, metadata_json)` scores one response;
- `pear_ray.tasks.verify.score_rows(table, task_config)` scores a table in Ray tasks with a per-sample timeout.

Tasks: any reasoning-gym dataset (`kind: reasoning_gym`, tested: basic_arithmetic, letter_counting,
spell_backward; `TINY_ARGS` has argument presets a tiny model can learn), multi-digit addition (`kind: addition`,
`task.args.digits`; with a scripted two-style behaviour policy, the PEAR experiment's task), and user data
(`kind: user`: a Parquet/JSONL file of prompt + answer given as `task.path`, checked by exact match,
`task.args.ignore_case` optional, or by math-verify with `task.verifier: math`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pear_ray.tasks.addition import AdditionTask
from pear_ray.tasks.base import Task, exact_score, explicit_answer, extract_answer, math_score, score_metadata
from pear_ray.tasks.reasoning_gym_task import TINY_ARGS, ReasoningGymTask
from pear_ray.tasks.user_task import UserTask

if TYPE_CHECKING:
    from pear_ray.config import DataConfig, TaskConfig

USER_ARGS = ("ignore_case",)


def make_task(task_config: TaskConfig, data_config: DataConfig | None = None, *, seed: int = 0) -> Task:
    """The job's task. `data_config.eval`, when set, is the held-out prompt file; `seed` fixes the split (the job's
    `task.split_seed`, not `job.seed`: every seed of an experiment sees the same prompts).

    Building a task reads no data file (files are read by `prompts`), so a verifier process can call this
    cheaply to score rows.
    """
    eval_path = data_config.eval if data_config is not None else None
    if task_config.kind == "reasoning_gym":
        return ReasoningGymTask(name=task_config.name, args=dict(task_config.args), num_train=task_config.num_train,
                                num_eval=task_config.num_eval, seed=seed, verifier=task_config.verifier,
                                eval_path=eval_path)
    if task_config.kind == "user":
        args = dict(task_config.args)
        unknown = sorted(set(args) - set(USER_ARGS))
        if unknown:
            raise ValueError(f"task.args of a user task accepts {list(USER_ARGS)}; unknown {unknown}")
        # `name` defaults to a reasoning-gym dataset name; a user task that does not set one is called "user".
        name = task_config.name if "name" in task_config.model_fields_set else "user"
        return UserTask(name=name, path=task_config.path, eval_path=eval_path,
                        verifier="exact" if task_config.verifier == "task" else task_config.verifier,
                        ignore_case=bool(args.get("ignore_case", False)), num_train=task_config.num_train,
                        num_eval=task_config.num_eval, seed=seed)
    if task_config.kind == "addition":
        unknown = sorted(set(task_config.args) - {"digits"})
        if unknown:
            raise ValueError(f"task.args of the addition task accepts ['digits']; unknown {unknown}")
        return AdditionTask(digits=int(task_config.args.get("digits", 3)), num_train=task_config.num_train,
                            num_eval=task_config.num_eval, seed=seed)
    raise ValueError(f"task.kind must be 'reasoning_gym', 'user' or 'addition', got {task_config.kind!r}")


__all__ = [
    "AdditionTask",
    "TINY_ARGS",
    "ReasoningGymTask",
    "Task",
    "UserTask",
    "exact_score",
    "explicit_answer",
    "extract_answer",
    "make_task",
    "math_score",
    "score_metadata",
]
