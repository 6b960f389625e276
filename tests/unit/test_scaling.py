"""The rule that sizes an elastic pool by what its phase waits on (pear_ray/actors/scaling.py), and the setting that
turns it on."""

import pytest

from pear_ray.actors.scaling import scale_target
from pear_ray.config import ConfigError, PoolScaling, RolloutResources, parse_job

RULE = PoolScaling(by="wait", window=4, grow_at=0.5, shrink_at=0.5)
WAITING, NOT_WAITING = 0.8, 0.1
BUSY, IDLE = 0.9, 0.2


def target(waits, busy, size=2, requested=2, low=1, high=4, rule=RULE):
    return scale_target(waits, busy, size=size, requested=requested, low=low, high=high, rule=rule)


def test_waiting_in_most_of_the_window_asks_for_one_more_actor():
    assert target([WAITING] * 4, [BUSY] * 4) == 3
    assert target([WAITING, NOT_WAITING, WAITING, WAITING], [BUSY] * 4) == 3  # most: 3 of 4
    assert target([WAITING, NOT_WAITING, WAITING, NOT_WAITING], [BUSY] * 4) == 2  # half is not most
    assert target([0.5] * 4, [BUSY] * 4) == 3  # grow_at is reached at the threshold itself


def test_nothing_moves_before_a_whole_window():
    assert target([WAITING] * 3, [BUSY] * 3) == 2
    assert target([NOT_WAITING] * 3, [IDLE] * 3) == 2


def test_only_the_last_window_counts():
    assert target([NOT_WAITING] * 10 + [WAITING] * 4, [IDLE] * 10 + [BUSY] * 4) == 3
    assert target([WAITING] * 10 + [NOT_WAITING] * 4, [BUSY] * 10 + [0.6] * 4) == 2


def test_growth_stops_at_max_and_waits_for_the_actor_already_asked_for():
    assert target([WAITING] * 4, [BUSY] * 4, size=4, requested=4) == 4  # max_actors
    assert target([WAITING] * 4, [BUSY] * 4, size=2, requested=3) == 3  # one asked for is not up yet


def test_a_pool_idle_through_the_window_releases_one_actor_down_to_its_minimum():
    assert target([NOT_WAITING] * 4, [IDLE] * 4, size=3, requested=3) == 2
    assert target([NOT_WAITING] * 4, [IDLE] * 4, size=1, requested=1) == 1  # num_actors
    assert target([NOT_WAITING] * 4, [0.0] * 4, size=3, requested=3, low=3) == 3
    assert target([NOT_WAITING] * 4, [IDLE, IDLE, BUSY, IDLE], size=3, requested=3) == 3  # one busy step: not idle


def test_idle_is_judged_as_if_one_actor_were_gone():
    # 0.3 busy with 2 actors would be 0.6 with one: not idle; with 4 actors it would be 0.4: idle.
    assert target([NOT_WAITING] * 4, [0.3] * 4, size=2, requested=2) == 2
    assert target([NOT_WAITING] * 4, [0.3] * 4, size=4, requested=4) == 3


def test_an_idle_pool_drops_a_pending_request_too_and_idle_wins_over_waiting():
    assert target([NOT_WAITING] * 4, [IDLE] * 4, size=3, requested=4) == 2
    # The consumer waited, yet the actors sat idle: more of them would not help (the wait is elsewhere).
    assert target([WAITING] * 4, [IDLE] * 4, size=3, requested=3) == 2


def test_what_is_asked_for_stays_within_min_and_max():
    assert target([NOT_WAITING] * 2, [BUSY] * 2, requested=9) == 4
    assert target([NOT_WAITING] * 2, [BUSY] * 2, requested=0) == 1


def test_one_wait_share_and_one_busy_share_per_step():
    with pytest.raises(ValueError, match="4 wait shares but 3 busy shares"):
        target([WAITING] * 4, [BUSY] * 3)


def pipeline(generate_seconds: float, train_seconds: float, size: int, steps: int = 60) -> list[int]:
    """A toy RL pipeline sized by the rule: each step needs `generate_seconds` of one actor's time (split over the
    pool) and `train_seconds` of the learner's, overlapped (max_staleness >= 1); an actor asked for joins one step
    later; a new window starts after every change, as actors/elastic.py does. Returns the pool's size per step."""
    requested, waits, busy, sizes = size, [], [], []
    for _ in range(steps):
        generate = generate_seconds / size
        step = max(generate, train_seconds)
        waits.append(max(0.0, generate - train_seconds) / step)
        busy.append(generate_seconds / (size * step))
        new = scale_target(waits, busy, size=size, requested=requested, low=1, high=8, rule=RULE)
        before = size
        if new < size:
            size = new  # released (it finishes its work first)
        elif size < requested:
            size += 1  # the actor asked for a step ago came up
        if new != requested or size != before:
            waits, busy = [], []
        requested = new
        sizes.append(size)
    return sizes


def test_the_pool_follows_the_bottleneck():
    generation_bound = pipeline(generate_seconds=8.0, train_seconds=1.0, size=1)
    assert generation_bound == sorted(generation_bound)  # only grows
    assert generation_bound[-1] == 5  # 8/5 = 1.6 s of generation for 1 s of training: waits 37% of a step
    learner_bound = pipeline(generate_seconds=2.0, train_seconds=4.0, size=6)
    assert learner_bound == sorted(learner_bound, reverse=True)  # only shrinks
    assert learner_bound[-1] == 1  # one actor generates in 2 s what the learner takes 4 s to train on
    balanced = pipeline(generate_seconds=4.0, train_seconds=2.0, size=2)
    assert set(balanced) == {2}  # 2 s of generation a step with 2 actors: neither waiting nor idle


def test_scale_by_wait_needs_an_elastic_pool_and_is_off_by_default():
    assert RolloutResources().scale.by == "max"
    with pytest.raises(ValueError, match="scale.by=wait sizes an elastic pool: set max_actors"):
        RolloutResources(scale={"by": "wait"})
    job = {"name": "x", "models": {"student": {"tiny": {}}}, "task": {"kind": "addition"}}
    parsed = parse_job({**job, "resources": {"rollout": {"max_actors": 3, "scale": {"by": "wait", "window": 2}}}})
    assert parsed.resources.rollout.scale == PoolScaling(by="wait", window=2)
    with pytest.raises(ConfigError, match="resources.rollout.scale.grow_at"):
        parse_job({**job, "resources": {"rollout": {"max_actors": 3, "scale": {"by": "wait", "grow_at": 1.5}}}})
