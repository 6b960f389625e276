"""What the run does on a preemption notice: the decisions of actors/draining.py, given which nodes are draining and
what runs where (the e2e drills in tests/e2e/test_preemption.py drain real nodes)."""

import math

import pytest

from pear_ray.actors.draining import (
    CALL_MARGIN_S,
    CHECKPOINT_SAFETY,
    NO_DEADLINE,
    give_up_at,
    learner_notice,
    leaving_members,
)
from pear_ray.actors.learner import LearnerPreempted

NOW = 1_000_000.0


def test_a_learner_stays_while_none_of_its_nodes_drains():
    assert learner_notice({}, ["a", "b"], NOW, 5.0) is None
    assert learner_notice({"c": NOW + 60}, ["a", "b"], NOW, 5.0) is None


def test_a_learner_moves_when_a_node_of_its_ranks_drains_by_the_first_deadline():
    notice = learner_notice({"b": NOW + 60, "c": NOW + 30, "x": NOW + 1}, ["a", "b", "b", "c"], NOW, 5.0)
    assert notice.ranks == (1, 2, 3) and notice.nodes == ("b", "c")
    assert notice.deadline == NOW + 30  # the first of its nodes to go; "x" holds no rank
    assert notice.checkpoint


@pytest.mark.parametrize("checkpoint_s, seconds_left, checkpoint", [
    (5.0, CHECKPOINT_SAFETY * 5.0, True),  # just time for it
    (5.0, CHECKPOINT_SAFETY * 5.0 - 0.1, False),  # too close: back to the last checkpoint instead
    (None, 0.5, True),  # no checkpoint written yet: try (one cut short is passed over on resume)
    (500.0, math.inf, True),  # no deadline
])
def test_the_checkpoint_is_taken_when_the_deadline_leaves_time_for_it(checkpoint_s, seconds_left, checkpoint):
    deadline = NO_DEADLINE if seconds_left == math.inf else NOW + seconds_left
    assert learner_notice({"a": deadline}, ["a"], NOW, checkpoint_s).checkpoint is checkpoint


def test_the_planned_restart_says_which_ranks_move_and_whether_it_checkpointed():
    notice = learner_notice({"a": NO_DEADLINE}, ["a", "b"], NOW, None)
    moved = LearnerPreempted(notice, 17)
    assert str(moved) == ("a node of learner rank(s) 0 is draining (no deadline); stopped after step 17, "
                          "checkpointed there")
    late = LearnerPreempted(learner_notice({"a": NOW + 1}, ["a"], NOW, 30.0), 3)
    assert late.what.endswith("stopped after step 3, too close to its deadline to checkpoint")


def test_pool_members_on_draining_nodes_leave_with_their_nodes_deadline():
    nodes = {0: "a", 1: "b", 2: None, 3: "a"}  # slot 2 has not started: its node is not known yet
    assert leaving_members({"a": NOW + 30, "c": NOW + 5}, nodes) == {0: NOW + 30, 3: NOW + 30}
    assert leaving_members({}, nodes) == {}


def test_a_leaving_actors_calls_are_given_up_a_margin_before_its_deadline_and_never_without_one():
    assert give_up_at(NOW + 30) == NOW + 30 - CALL_MARGIN_S
    assert give_up_at(NO_DEADLINE) == NO_DEADLINE
