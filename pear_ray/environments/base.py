"""What an environment is: a multi-turn task the policy talks to, one episode per sampled trajectory.

The interface is gymnasium's `Env` protocol with text spaces, adopted as it is (docs/design.md, "Environments"):

    observation, info = env.reset(seed=seed, options={"row": row})
    observation, reward, terminated, truncated, info = env.step(action)

- `row` is the prompt row the episode plays (id, prompt, answer, metadata as a dict): the prompt itself is the first
  observation the policy sees, so `reset` returns "" unless the environment adds to it;
- `action` is the text of one assistant turn (the sampled ids decoded, special tokens dropped);
- `observation` is the environment's answer as text; the rollout tokenizes it as a tool turn (`observation_ids`) and
  appends those ids after the policy's, never re-tokenizing what the policy sampled;
- `reward` adds up over the episode; `terminated` ends it (the task is over), `truncated` too (a limit was hit).

So any `gymnasium.Env` whose observations and actions are text plugs in without an adapter. An environment kind
registers a builder `(environment_config, task) -> factory`, where `factory()` makes one fresh, picklable
environment per episode: the rollout steps it in a Ray task's child process under `task.environment.step_timeout_s`
(pear_ray/environments/stepping.py) and gets it back, stepped, by pickle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pear_ray.config import EnvironmentConfig

TOOL_ROLE = "tool"
# An episode's finish reason when its environment ended it by failing (its reward is then 0); otherwise the last
# turn's own ("stop" or "length").
ENV_ERROR, ENV_TIMEOUT = "env_error", "env_timeout"


@runtime_checkable
class Environment(Protocol):
    """gymnasium's Env, text in and text out (see the module docstring)."""

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict]:
        ...

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        ...


EnvironmentFactory = Callable[[], Environment]
EnvironmentBuilder = Callable[["EnvironmentConfig", Any], EnvironmentFactory]  # (config, the job's task) -> factory

ENVIRONMENTS: dict[str, EnvironmentBuilder] = {}


def register_environment(kind: str) -> Callable[[EnvironmentBuilder], EnvironmentBuilder]:
    """Decorator: `task.environment.kind: <kind>` is built by the decorated function."""

    def register(builder: EnvironmentBuilder) -> EnvironmentBuilder:
        if kind in ENVIRONMENTS:
            raise ValueError(f"environment {kind!r} is registered twice ({ENVIRONMENTS[kind].__module__} and "
                             f"{builder.__module__})")
        ENVIRONMENTS[kind] = builder
        return builder

    return register


def observation_ids(tokenizer, text: str) -> list[int]:
    """An observation as the ids the policy reads next: a tool turn through the chat template, ready for the
    assistant's reply (`<|im_start|>tool\\n{text}<|im_end|>\\n<|im_start|>assistant\\n` with the tiny models'
    template); without a chat template, the text and a newline. The scripted teacher's trajectories and the rollouts
    both use this, so SFT data and RL samples put the same ids between turns."""
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": TOOL_ROLE, "content": text}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    return tokenizer.encode(text + "\n", add_special_tokens=False)
