"""The multi-turn episode loop, token-exact: a trajectory is the ids the policy sampled and the ids the environment's
answers became, in order, never text decoded and encoded again. No Ray here: the rollout actor gives the loop its
engine's generation and `stepping.step_environments`.

An episode's response is turn 1's sampled ids, `observation_ids(observation 1)`, turn 2's sampled ids, ... The
policy's ids are marked in `policy_mask` and carry their rollout log-probs; the environment's carry log-prob 0.0. Every
live episode's next turn goes into one generation call, and a sample's turn k is drawn with `turn_seed(its seed, k)`,
so an episode is the same whatever other episodes share its calls.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pear_ray.environments.base import Environment, EnvironmentFactory, observation_ids
from pear_ray.environments.stepping import Reset, Transition

# (contexts, one seed each, max_tokens) -> one sample each, with .response_ids, .logprobs, .finish_reason
Generate = Callable[[list[list[int]], list[int | None], int], list[Any]]
Step = Callable[[list[Environment], list[Reset | str]], list[Transition]]


def turn_seed(sample_seed: int | None, turn: int) -> int | None:
    """The seed of a sample's turn (0-based): its own seed for the first turn (so a one-turn episode samples what
    `generate` would), then a hash of (seed, turn), so no two turns or samples share one."""
    if sample_seed is None or turn == 0:
        return sample_seed
    digest = hashlib.blake2b(f"{sample_seed}/{turn}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**31


@dataclass
class Episode:
    """One trajectory as it is played."""

    prompt_ids: list[int]
    seed: int | None
    env: Environment | None = None
    response_ids: list[int] = field(default_factory=list)
    policy_mask: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: list[list[int]] = field(default_factory=list)  # each turn's sampled ids
    observations: list[str] = field(default_factory=list)  # each observation the policy read after a turn
    reward: float = 0.0
    finish_reason: str | None = None  # set when the episode is over
    message: str = ""  # the environment's failure, if any

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    def add(self, ids: list[int], *, policy: bool, logprobs: list[float] | None = None) -> None:
        self.response_ids += ids
        self.policy_mask += [policy] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)

    def fail(self, transition: Transition) -> None:
        self.reward, self.finish_reason, self.message, self.env = 0.0, transition.failure, transition.message, None


def play_episodes(prompts: Sequence[list[int]], rows: Sequence[dict[str, Any]], seeds: Sequence[int | None], *,
                  n: int, make_env: EnvironmentFactory, generate: Generate, step: Step, tokenizer,
                  max_turns: int, max_tokens: int, max_model_len: int) -> list[Episode]:
    """n episodes per prompt (row-major: prompt i's sample j is episode i * n + j, seeded seeds[i] + j), played turn
    by turn until the environment ends them, `max_turns` turns were played, or the next turn (its context plus
    max_tokens) would not fit `max_model_len` (finish reason "length"). An episode's finish reason is its last turn's
    ("stop", "length"), or "env_error" / "env_timeout" when its environment failed (reward 0). The observation after the
    last turn is not appended: no turn reads it."""
    episodes = [Episode(list(prompt), None if seed is None else seed + j)
                for prompt, seed in zip(prompts, seeds, strict=True) for j in range(n)]
    resets = [Reset(dict(rows[i // n]), episode.seed) for i, episode in enumerate(episodes)]
    for episode, transition in zip(episodes, step([make_env() for _ in episodes], resets), strict=True):
        if transition.failure is not None:
            episode.fail(transition)
            continue
        episode.env = transition.env
        if transition.observation:  # an environment that adds to the prompt: the policy reads it first
            episode.observations.append(transition.observation)
            episode.add(observation_ids(tokenizer, transition.observation), policy=False)
    live = [episode for episode in episodes if episode.finish_reason is None]
    for turn in range(max_turns):
        fits = []
        for episode in live:
            if len(episode.context) + max_tokens > max_model_len:
                episode.finish_reason = "length"
            else:
                fits.append(episode)
        if not fits:
            break
        samples = generate([e.context for e in fits], [turn_seed(e.seed, turn) for e in fits], max_tokens)
        for episode, sample in zip(fits, samples, strict=True):
            episode.turns.append(list(sample.response_ids))
            episode.add(list(sample.response_ids), policy=True, logprobs=list(sample.logprobs))
            episode.finish_reason = sample.finish_reason
        actions = [tokenizer.decode(e.turns[-1], skip_special_tokens=True) for e in fits]
        transitions = step([e.env for e in fits], actions)
        live = []
        for episode, transition in zip(fits, transitions, strict=True):
            if transition.failure is not None:
                episode.fail(transition)
                continue
            episode.env, episode.reward = transition.env, episode.reward + transition.reward
            if not transition.done and turn + 1 < max_turns:
                episode.observations.append(transition.observation)
                episode.add(observation_ids(tokenizer, transition.observation), policy=False)
                live.append(episode)
    return episodes
