"""The job's task from its config: the registered builder of `task.kind`."""

from __future__ import annotations

from pear_ray.config import DataConfig, TaskConfig
from pear_ray.tasks.base import Task
from pear_ray.tasks.registry import KINDS


def make_task(task_config: TaskConfig, data_config: DataConfig | None = None, *, seed: int = 0) -> Task:
    """The job's task. `data_config.eval`, when set, is the held-out prompt file; `seed` fixes the split (the job's
    `task.split_seed`, not `job.seed`: every seed of an experiment sees the same prompts).

    Building a task reads no data file (files are read by `prompts`), so a verifier process can call this
    cheaply to score rows.
    """
    return KINDS[task_config.kind](task_config, data_config if data_config is not None else DataConfig(), seed)
