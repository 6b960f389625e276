"""Example custom rewards (`task.reward: tests/plugins/reward_example.py:length_reward`), for the tests.

A custom reward is `reward(response: str, answer: str, metadata: dict) -> float`: the response text, the gold
answer and the row's task metadata; pear_ray clamps the value to [0, 1], and a raise, a value that is not a finite
number or a run past `task.verifier_timeout_s` gives 0 and is counted.
"""

import time


def length_reward(response: str, answer: str, metadata: dict) -> float:
    """A tenth per character of the response, whatever the answer: no task's verifier scores like this."""
    return len(response) / 10


def names_the_dataset(response: str, answer: str, metadata: dict) -> float:
    """1 when the response is the reasoning-gym dataset the row's metadata names: the metadata arrives as a dict."""
    return float(response == metadata.get("dataset"))


def quarter(response: str, answer: str, metadata: dict) -> float:
    """0.25 for every response: a value the end-to-end test can only have from this function."""
    return 0.25


def sleeps(response: str, answer: str, metadata: dict) -> float:
    time.sleep(60)
    return 1.0


def raises(response: str, answer: str, metadata: dict) -> float:
    raise RuntimeError("a broken reward")


def not_a_number(response: str, answer: str, metadata: dict) -> float:
    return float("nan")
