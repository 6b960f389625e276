"""A calculator tool: the policy may write `<calc>345+678</calc>` in a turn, the environment answers `1023`, and the
turn without a call is the final answer, rewarded by the task's own verifier.

Any task whose answers are numbers can run with it (`task.environment: {kind: calculator}`); the addition world's
scripted teacher writes tool-using trajectories in this format (pear_ray/tasks/addition.py, policy `tool_use`).
An expression is two non-negative integers of at most MAX_DIGITS digits and one of + - *; anything else in a call is
answered `error`, so the policy learns the format from its rewards, not from a crash.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import gymnasium
from gymnasium import spaces

from pear_ray.environments.base import register_environment

CALL = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)
MAX_DIGITS = 12
EXPRESSION = re.compile(rf"\s*(\d{{1,{MAX_DIGITS}}})\s*([-+*])\s*(\d{{1,{MAX_DIGITS}}})\s*")
TEXT_LENGTH = 4096  # the longest action or observation the spaces describe
TOOL, DIRECT = "tool", "direct"
ERROR = "error"


def call_text(expression: str) -> str:
    """A call as the policy writes it."""
    return f"<calc>{expression}</calc>"


def evaluate(expression: str) -> str:
    """The calculator's answer to one expression: the integer result, or `error` for anything it does not take."""
    match = EXPRESSION.fullmatch(expression)
    if match is None:
        return ERROR
    left, operator, right = int(match[1]), match[2], int(match[3])
    return str({"+": left + right, "-": left - right, "*": left * right}[operator])


class CalculatorEnv(gymnasium.Env):
    """One episode over one prompt row: each turn with a call gets the calculator's answer; the first turn without
    one ends the episode with the task's reward for that text."""

    def __init__(self, task):
        self.task = task
        self.action_space = spaces.Text(TEXT_LENGTH)
        self.observation_space = spaces.Text(TEXT_LENGTH)
        self.row: dict[str, Any] = {}
        self.calls = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict]:
        super().reset(seed=seed)
        self.row, self.calls = dict((options or {})["row"]), 0
        return "", {}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        call = CALL.search(action)
        if call is not None:
            self.calls += 1
            return evaluate(call[1]), 0.0, False, False, {"calls": self.calls}
        reward = float(self.task.score(action, self.row["answer"], self.row.get("metadata")))
        return "", reward, True, False, {"calls": self.calls}


@dataclass
class Calculator:
    """The factory: a fresh CalculatorEnv per episode. It also names the styles an episode comes in, so eval and RL
    report the tool-call rate (`share_tool`) as they report any task's style shares."""

    task: Any
    styles: tuple[str, ...] = (TOOL, DIRECT)

    def __call__(self) -> CalculatorEnv:
        return CalculatorEnv(self.task)

    @staticmethod
    def style(text: str) -> str:
        """TOOL for an episode with at least one call, DIRECT for one without."""
        return TOOL if CALL.search(text) else DIRECT


@register_environment("calculator")
def build_calculator(config, task) -> Calculator:
    if config.args:
        raise ValueError(f"task.environment.args of the calculator takes nothing; got {sorted(config.args)}")
    return Calculator(task)
