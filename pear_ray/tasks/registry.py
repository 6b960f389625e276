"""The task kinds and verifiers pear_ray knows, filled in by the task modules as they are imported.

A task module registers
- its kind: `@register_kind("addition")` on a builder `(task_config, data_config, seed) -> Task`, which checks the
  kind's `task.args` (`make_task` in pear_ray.tasks.build calls it; `task.kind` is checked against `KINDS`);
- its verifiers, if it has its own: `@register_verifier("reasoning_gym", warm_up=...)` on a function
  `(response, answer, metadata dict) -> float`, what `score_metadata` calls for a row whose metadata names it;
  `warm_up(metadatas)`, optional, gets those rows' metadata in a verifier worker before it forks its scoring
  processes (imports, cached datasets), so a child does not spend a sample's timeout loading them.

`pear_ray.tasks` imports every module of the package, so a new task is one new file there. This module imports
nothing of the package, so any task module can import it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pear_ray.config import DataConfig, TaskConfig

TaskBuilder = Callable[["TaskConfig", "DataConfig", int], Any]  # returns a pear_ray.tasks.base.Task
Verifier = Callable[[str, str, dict[str, Any]], float]
WarmUp = Callable[[list[dict[str, Any]]], None]

KINDS: dict[str, TaskBuilder] = {}
VERIFIERS: dict[str, Verifier] = {}
WARM_UPS: dict[str, WarmUp] = {}


def register_kind(kind: str) -> Callable[[TaskBuilder], TaskBuilder]:
    """Decorator: `kind` (a `task.kind` value) is built by the decorated function."""

    def register(builder: TaskBuilder) -> TaskBuilder:
        _refuse_twice(KINDS, kind, "task kind")
        KINDS[kind] = builder
        return builder

    return register


def register_verifier(name: str, *, warm_up: WarmUp | None = None) -> Callable[[Verifier], Verifier]:
    """Decorator: rows whose metadata says `"verifier": name` are scored by the decorated function."""

    def register(verifier: Verifier) -> Verifier:
        _refuse_twice(VERIFIERS, name, "verifier")
        VERIFIERS[name] = verifier
        if warm_up is not None:
            WARM_UPS[name] = warm_up
        return verifier

    return register


def _refuse_twice(registry: dict[str, Any], name: str, what: str) -> None:
    """Two modules claiming one name is a mistake that would otherwise depend on import order."""
    if name in registry:
        raise ValueError(f"{what} {name!r} is registered twice ({registry[name].__module__} and another module)")
