"""The job's task from its config: the registered builder of `task.kind`, scored by the job's custom reward
(`task.reward`) instead of the task's verifier when the job names one, and played as multi-turn episodes when the job
names an environment (`task.environment`, EpisodicTask).

A custom reward is a function `reward(response: str, answer: str, metadata: dict) -> float`, given by import path
(`package.module:function` or `path/to/file.py:function`, see pear_ray.plugins): the response text, the gold answer
and the row's task metadata (the dict its `metadata` JSON holds). It runs where verifiers run (pear_ray.tasks.verify:
a Ray task's child process, under `task.verifier_timeout_s` per sample); its value is clamped to [0, 1], and a
raise, a hang or a value that is not a finite number gives 0 and is counted, as for any verifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import pyarrow as pa

from pear_ray.config import DataConfig, EnvironmentConfig, TaskConfig
from pear_ray.environments import ENVIRONMENTS
from pear_ray.environments.base import EnvironmentBuilder, EnvironmentFactory
from pear_ray.plugins import load_callable
from pear_ray.tasks.base import Split, Task, load_metadata, task_styles
from pear_ray.tasks.registry import KINDS


@dataclass
class WrappedTask:
    """A task with one thing changed by a subclass: it keeps the task's name, prompts and response styles."""

    task: Task

    @property
    def name(self) -> str:
        return self.task.name

    def prompts(self, split: Split, n: int | None = None) -> pa.Table:
        return self.task.prompts(split, n)

    def score(self, response: str, answer: str, metadata: str | None = None) -> float:
        return self.task.score(response, answer, metadata)

    @property
    def styles(self) -> tuple[str, ...]:
        return task_styles(self.task)

    def style(self, response: str) -> str | None:
        return self.task.style(response)


@dataclass
class CustomReward(WrappedTask):
    """A task whose rewards come from the function `reward` names (a custom reward changes how responses score, not
    how they are written). The spec, not the function, is shipped to the scoring processes (which load it once
    each): a function defined in a file loaded by path cannot be pickled by reference."""

    reward: str

    def score(self, response: str, answer: str, metadata: str | None = None) -> float:
        return load_callable(self.reward)(response, answer, load_metadata(metadata))


@dataclass
class EpisodicTask(WrappedTask):
    """A task played as multi-turn episodes with the environment `task.environment` names: the task gives the
    prompts and the verifier (which the environment may use for its reward); the environment plays each sample. The
    styles an episode comes in are the environment's when it names any (the calculator: tool or direct), else the
    task's. Shipped to the rollout actors, which build the environment from it (`environment()`)."""

    config: EnvironmentConfig
    builder: EnvironmentBuilder  # the kind's, looked up where the task is made (`with_environment`)

    def environment(self) -> EnvironmentFactory:
        """The builder's factory of fresh environments (one per episode)."""
        return self.builder(self.config, self.task)

    @cached_property
    def _styled(self) -> Any:
        """What classifies an episode's style: the environment's factory when it names styles, else the task
        (built once, not once per sample classified)."""
        factory = self.environment()
        return factory if task_styles(factory) else self.task

    @property
    def styles(self) -> tuple[str, ...]:
        return task_styles(self._styled)

    def style(self, response: str) -> str | None:
        return self._styled.style(response)


def make_task(task_config: TaskConfig, data_config: DataConfig | None = None, *, seed: int = 0) -> Task:
    """The job's task. `data_config.eval`, when set, is the held-out prompt file; `seed` fixes the split (the job's
    `task.split_seed`, not `job.seed`: every seed of an experiment sees the same prompts).

    Building a task reads no data file (files are read by `prompts`), so a verifier process can call this
    cheaply to score rows.
    """
    task = KINDS[task_config.kind](task_config, data_config if data_config is not None else DataConfig(), seed)
    task = CustomReward(task, task_config.reward) if task_config.reward is not None else task
    return task if task_config.environment is None else with_environment(task, task_config.environment)


def with_environment(task: Task, config: EnvironmentConfig) -> EpisodicTask:
    """`task` played as episodes with `config`'s environment. The kind's builder is looked up here, in the driver where
    the config was checked, and travels with the task, so a kind registered outside pear_ray.environments (a test's,
    a plug-in file's) works in the rollout actors too."""
    return EpisodicTask(task, config, ENVIRONMENTS[config.kind])
