"""The episode loop (environments/episodes.py) without Ray or an engine: a generation that writes known ids for its
seed, the test environment stepped in forked children (stepping.step_chunk), the tiny model's tokenizer."""

import time

import pytest
from support.environments import STEP_REWARD, build_scripted
from transformers import AutoTokenizer

from pear_ray.config import EnvironmentConfig
from pear_ray.engines.rollout_engine import Sample
from pear_ray.environments import observation_ids
from pear_ray.environments.base import ENV_ERROR, ENV_TIMEOUT
from pear_ray.environments.episodes import play_episodes, turn_seed
from pear_ray.environments.stepping import step_chunk

TURN = 3  # ids per generated turn


def seeded_turn(seed: int) -> list[int]:
    return [10 + (seed + i) % 200 for i in range(TURN)]


def generate(contexts, seeds, max_tokens):
    """Known ids for each seed (whatever else shares the call), log-prob -0.5 each, ended by a stop token."""
    assert max_tokens == TURN
    return [Sample(seeded_turn(seed), [-0.5] * TURN, "stop") for seed in seeds]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def play(tokenizer, rows, *, n=1, seed=100, max_turns=3, max_model_len=512, timeout_s=5.0):
    config = EnvironmentConfig(kind="scripted_test", max_turns=max_turns, step_timeout_s=timeout_s,
                               args={"observation": "obs", "hang_s": 30})
    prompts = [[1, 20 + i, 21] for i in range(len(rows))]
    return play_episodes(prompts, rows, [seed + 10 * i for i in range(len(rows))], n=n,
                         make_env=build_scripted(config, None), generate=generate,
                         step=lambda envs, actions: step_chunk(envs, actions, timeout_s), tokenizer=tokenizer,
                         max_turns=max_turns, max_tokens=TURN, max_model_len=max_model_len)


def row(i, misbehave=None):
    return {"id": f"r{i}", "prompt": "p", "metadata": {"misbehave": misbehave} if misbehave else {}}


def test_turn_seeds_depend_on_the_sample_and_turn_only():
    assert turn_seed(7, 0) == 7
    assert turn_seed(None, 2) is None
    seeds = {turn_seed(s, k) for s in range(50) for k in range(1, 4)}
    assert len(seeds) == 150 and not seeds & set(range(50))
    assert turn_seed(7, 2) == turn_seed(7, 2)


def test_a_trajectory_is_the_turns_and_the_observations_ids_in_order(tokenizer):
    [episode] = play(tokenizer, [row(0)])
    seeds = [turn_seed(100, k) for k in range(3)]
    env_ids = [observation_ids(tokenizer, f"obs (turn {k})") for k in (1, 2)]
    expected = seeded_turn(seeds[0]) + env_ids[0] + seeded_turn(seeds[1]) + env_ids[1] + seeded_turn(seeds[2])
    assert episode.response_ids == expected
    assert episode.turns == [seeded_turn(s) for s in seeds]
    assert episode.observations == ["obs (turn 1)", "obs (turn 2)"]  # the state came back from each child
    mask = [True] * TURN + [False] * len(env_ids[0]) + [True] * TURN + [False] * len(env_ids[1]) + [True] * TURN
    assert episode.policy_mask == mask
    assert episode.logprobs == [-0.5 if m else 0.0 for m in mask]
    assert episode.reward == 3 * STEP_REWARD
    assert episode.finish_reason == "stop"  # the last turn's


def test_an_episode_stops_when_the_next_turn_would_not_fit(tokenizer):
    prompt_and_turn = 3 + TURN
    [episode] = play(tokenizer, [row(0)], max_model_len=prompt_and_turn + 5)
    assert episode.turns == [seeded_turn(100)]
    assert len(episode.observations) == 1 and episode.finish_reason == "length"
    assert episode.reward == STEP_REWARD


def test_failing_environments_end_their_episodes_alone(tokenizer):
    start = time.monotonic()
    episodes = play(tokenizer, [row(0, "raise"), row(1), row(2, "hang"), row(3)], timeout_s=0.5)
    assert time.monotonic() - start < 10  # the hang is 30 s
    assert [e.finish_reason for e in episodes] == [ENV_ERROR, "stop", ENV_TIMEOUT, "stop"]
    assert [e.reward for e in episodes] == [0.0, 3 * STEP_REWARD, 0.0, 3 * STEP_REWARD]
    assert "RuntimeError: scripted environment bug" in episodes[0].message
    assert [len(e.turns) for e in episodes] == [1, 3, 1, 3]


def test_same_seed_same_episodes_whatever_shares_the_call(tokenizer):
    together = play(tokenizer, [row(0), row(1)], n=2)
    alone = play(tokenizer, [row(0)], n=2) + play(tokenizer, [row(1)], n=2, seed=110)
    assert [e.response_ids for e in together] == [e.response_ids for e in alone]
    assert len({tuple(e.response_ids) for e in together}) == 4
