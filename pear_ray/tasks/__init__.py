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

A new task is one new module here that registers its kind (and its verifier, if it has its own) with
pear_ray.tasks.registry. A job's `task.reward` (a function by import path) replaces the task's verifier: see
pear_ray.tasks.build.
"""

from __future__ import annotations

import importlib
import pkgutil

from pear_ray.tasks.addition import AdditionTask
from pear_ray.tasks.answers import exact_score, explicit_answer, extract_answer, math_score, score_metadata
from pear_ray.tasks.base import Task
from pear_ray.tasks.build import CustomReward, make_task
from pear_ray.tasks.reasoning_gym_task import TINY_ARGS, ReasoningGymTask
from pear_ray.tasks.registry import KINDS, VERIFIERS, register_kind, register_verifier
from pear_ray.tasks.user_task import UserTask

# Every module of the package, so each registers its kind and verifiers: a new task is one new file.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "AdditionTask",
    "CustomReward",
    "KINDS",
    "TINY_ARGS",
    "ReasoningGymTask",
    "Task",
    "UserTask",
    "VERIFIERS",
    "exact_score",
    "explicit_answer",
    "extract_answer",
    "make_task",
    "math_score",
    "register_kind",
    "register_verifier",
    "score_metadata",
]
