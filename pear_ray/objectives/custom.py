"""A plug-in objective: a function named by import path with the built-in objectives' typed inputs and outputs.

    def my_loss(inputs: ObjectiveInputs, **args) -> LossTerms

`inputs` holds the response tokens' log-probs (with grad), the mask (the tokens the policy sampled), the columns the
job lists in `columns`, and `logp_old` when `on_policy`; the function returns the loss as a sum with the size it is
divided by, as the built-ins do (objectives/base.py), so the learner reduces it over ranks unchanged. Statistics it
returns are summed over ranks and updates; each is logged divided by the global `num_tokens` when the function reports
that, else as the sum.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from pear_ray.objectives.base import LossTerms, ObjectiveConfig, ObjectiveInputs
from pear_ray.plugins import checked_spec, load_callable


class CustomObjective(ObjectiveConfig):
    """A plug-in objective: `function(inputs: ObjectiveInputs, **args) -> LossTerms`, named by import path, which
    returns the loss as a sum and the size it is divided by, as the built-in objectives do
    (pear_ray/objectives/custom.py)."""

    kind: Literal["custom"] = Field("custom", description="the objective")
    function: str = Field(description="'package.module:function' or 'path/to/file.py:function'")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the function")
    needs: list[str] = Field(default_factory=list, description="batch columns the function reads")
    sampled: bool = Field(False, description="on-policy (RL): score at the sampling temperature, give logp_old")

    @field_validator("function")
    @classmethod
    def _loads(cls, spec: str) -> str:
        return checked_spec(spec)

    def columns(self) -> tuple[str, ...]:
        return tuple(self.needs)

    def on_policy(self) -> bool:
        return self.sampled

    def size_reads_model(self) -> bool:
        return True  # the function's size may read anything

    def loss(self, inputs: ObjectiveInputs) -> LossTerms:
        terms = load_callable(self.function)(inputs, **self.args)
        if not isinstance(terms, LossTerms):
            raise TypeError(f"objective {self.function} returned {type(terms).__name__}, not LossTerms")
        return terms

    def report(self, stats: dict[str, float]) -> dict[str, float]:
        if "num_tokens" not in stats:
            return dict(stats)
        count = max(stats["num_tokens"], 1.0)
        return {name: value if name == "num_tokens" else value / count for name, value in stats.items()}
