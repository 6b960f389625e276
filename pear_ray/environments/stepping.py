"""Environments stepped where verifiers run: in Ray tasks (a fraction of a CPU each), each reset or step in a forked
child process under `task.environment.step_timeout_s` (`forked.call_in_child`), the stepped environment sent back by
pickle so its state survives to the next turn.

- an environment that raises (or answers something that is not text and a finite reward) ends its episode: reward
  0, counted as an environment error;
- one still running at the deadline ends its episode too: reward 0, counted as a timeout; its child is killed and a
  fresh one takes the other episodes of the chunk.
So one bad episode neither crashes nor hangs the rollout, and the other episodes of the call play on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray

from pear_ray.environments.base import ENV_ERROR, ENV_TIMEOUT, Environment
from pear_ray.forked import call_in_child

if TYPE_CHECKING:
    pass

DEFAULT_CHUNK_CALLS = 64
DEFAULT_NUM_CPUS = 0.25


@dataclass(frozen=True)
class Reset:
    """The action that starts an episode: `env.reset(seed=seed, options={"row": row})`."""

    row: dict[str, Any]
    seed: int | None


@dataclass
class Transition:
    """What one reset or step gave: the environment after it, its observation and reward, whether the episode is
    over (terminated or truncated), and `failure` (ENV_ERROR or ENV_TIMEOUT, with a message) when it went wrong."""

    env: Environment | None
    observation: str = ""
    reward: float = 0.0
    done: bool = False
    failure: str | None = None
    message: str = ""


def _apply(call: tuple[Environment, Reset | str]) -> tuple[Environment, str, float, bool]:
    """Runs in the child: one reset or step, checked, with the environment it changed."""
    env, action = call
    if isinstance(action, Reset):
        observation, _ = env.reset(seed=action.seed, options={"row": action.row})
        reward, done = 0.0, False
    else:
        observation, reward, terminated, truncated, _ = env.step(action)
        reward, done = float(reward), bool(terminated or truncated)
    if not isinstance(observation, str):
        raise TypeError(f"the observation must be text, got {type(observation).__name__}")
    if not math.isfinite(reward):
        raise ValueError(f"the reward must be finite, got {reward}")
    return env, observation, reward, done


def step_chunk(envs: Sequence[Environment], actions: Sequence[Reset | str], timeout_s: float) -> list[Transition]:
    """One transition per (environment, action), in order, each call in a forked child under `timeout_s`. No Ray."""
    transitions = []
    for outcome in call_in_child(_apply, list(zip(envs, actions, strict=True)), timeout_s):
        if outcome.status == "ok":
            transitions.append(Transition(*outcome.value))
        elif outcome.status == "timeout":
            transitions.append(Transition(None, done=True, failure=ENV_TIMEOUT,
                                          message=f"no answer within {timeout_s:g} s"))
        else:
            transitions.append(Transition(None, done=True, failure=ENV_ERROR, message=outcome.message))
    return transitions


_step_chunk_remote = ray.remote(step_chunk)


def step_environments(envs: Sequence[Environment], actions: Sequence[Reset | str], timeout_s: float, *,
                      chunk_calls: int = DEFAULT_CHUNK_CALLS, num_cpus: float = DEFAULT_NUM_CPUS) -> list[Transition]:
    """`step_chunk` over all (environment, action) pairs, `chunk_calls` pairs per Ray task asking `num_cpus` CPUs
    (so stepping fits beside the actors that hold most of them), in order."""
    refs = [_step_chunk_remote.options(num_cpus=num_cpus).remote(envs[start:start + chunk_calls],
                                                                 actions[start:start + chunk_calls], timeout_s)
            for start in range(0, len(envs), chunk_calls)]
    return [transition for chunk in ray.get(refs) for transition in chunk]
