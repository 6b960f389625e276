"""A test environment, kind `scripted_test`: it answers every turn with `args.observation` and a reward of 0.25 per
step, records the actions it got (so a test can see its state survived the trip through the stepping tasks), and
never ends an episode itself (max_turns does). A prompt row's metadata `{"misbehave": "raise" | "hang"}` makes it raise
or sleep `args.hang_s` at the first step instead, for the failure tests.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import ray.cloudpickle

from pear_ray.environments import register_environment

KIND = "scripted_test"
STEP_REWARD = 0.25


class ScriptedEnvironment:
    def __init__(self, observation: str, hang_s: float):
        self.observation, self.hang_s = observation, hang_s
        self.misbehave: str | None = None
        self.actions: list[str] = []

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict]:
        self.misbehave = options["row"]["metadata"].get("misbehave")
        return "", {}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        if self.misbehave == "raise":
            raise RuntimeError("scripted environment bug")
        if self.misbehave == "hang":
            time.sleep(self.hang_s)
        self.actions.append(action)
        return f"{self.observation} (turn {len(self.actions)})", STEP_REWARD, False, False, {}


@register_environment(KIND)
def build_scripted(config, task):
    return lambda: ScriptedEnvironment(config.args.get("observation", "ok"), config.args.get("hang_s", 60.0))


# Ray workers cannot import tests/support by name: ship this module's functions and classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
