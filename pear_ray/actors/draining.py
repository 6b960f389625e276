"""Notice that a node is about to go, and what the run does about it.

Ray marks a node *draining*, with a deadline, before it goes: its raylet got SIGTERM (a spot VM's shutdown, a
Kubernetes pod deleted), `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds N` was
run, or the autoscaler passed on a cloud's preemption notice. From then on Ray places nothing new on it. The GCS
keeps the draining nodes and their deadlines; `draining_nodes()` reads them (one small RPC, under a millisecond).

What to do is decided by pure functions of that map and of what runs where, asked at cheap moments:
  learner_notice  at every step boundary of the training loop: a node of the learner's ranks is draining, so the
                  stage checkpoints there (if the deadline leaves time for one) and restarts on other nodes
  leaving_members whenever a pool hands out or waits for work: a member whose node is draining takes no new work,
                  and its calls in flight may finish until `give_up_at`, after which they run again elsewhere
A node that goes without notice (SIGKILL, a crash) is found the old way: its actors' calls fail.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray

NO_DEADLINE = math.inf
CHECKPOINT_SAFETY = 2.0  # a notice leaves time to checkpoint when the deadline is this many last checkpoints away
CALL_MARGIN_S = 5.0  # a leaving actor's calls are given up this long before its node's deadline, to run elsewhere


def draining_nodes() -> dict[str, float]:
    """The nodes marked draining now: node id (hex) -> the Unix time by which it goes (NO_DEADLINE: none given).
    Ray 2.60 has no public call for this; Ray Train's preemption watcher and Serve read the GCS the same way."""
    return {node: deadline_ms / 1000 if deadline_ms else NO_DEADLINE
            for node, deadline_ms in ray._private.state.state.get_draining_nodes().items()}


class DrainWatch:
    """`draining_nodes()`, asked of the GCS at most every `poll_s` seconds: cheap enough for every step and every
    wait of a pool."""

    def __init__(self, poll_s: float = 1.0):
        self.poll_s = poll_s
        self.asked_at, self.nodes = -math.inf, {}

    def __call__(self) -> dict[str, float]:
        if time.monotonic() - self.asked_at >= self.poll_s:
            self.nodes, self.asked_at = draining_nodes(), time.monotonic()
        return self.nodes


def node_of(actor: Any) -> ray.ObjectRef:
    """Ref of the id of the node an actor runs on, resolved once its constructor has run (any actor class)."""
    return actor.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id())


@dataclass(frozen=True)
class LearnerNotice:
    """Ranks of a learner on draining nodes: the group must move before `deadline` (Unix time)."""

    ranks: tuple[int, ...]
    nodes: tuple[str, ...]
    deadline: float  # the first of those nodes' deadlines; NO_DEADLINE: none given
    checkpoint: bool  # time enough to checkpoint first; else the stage goes back to its last checkpoint

    def __str__(self) -> str:
        left = "no deadline" if self.deadline == NO_DEADLINE else f"{self.deadline - time.time():.0f} s left"
        ranks = ", ".join(map(str, self.ranks))
        return f"a node of learner rank(s) {ranks} is draining ({left})"


def learner_notice(draining: Mapping[str, float], rank_nodes: Sequence[str], now: float,
                   checkpoint_s: float | None) -> LearnerNotice | None:
    """Whether the learner whose rank r runs on `rank_nodes[r]` must move, at Unix time `now`, and whether there is
    time to checkpoint first: CHECKPOINT_SAFETY x the last checkpoint's duration (`checkpoint_s`; None: none written
    yet, so try, as a checkpoint cut short is passed over on resume)."""
    ranks = tuple(rank for rank, node in enumerate(rank_nodes) if node in draining)
    if not ranks:
        return None
    nodes = tuple(dict.fromkeys(rank_nodes[rank] for rank in ranks))
    deadline = min(draining[node] for node in nodes)
    checkpoint = checkpoint_s is None or now + CHECKPOINT_SAFETY * checkpoint_s <= deadline
    return LearnerNotice(ranks, nodes, deadline, checkpoint)


def leaving_members(draining: Mapping[str, float], member_nodes: Mapping[int, str | None]) -> dict[int, float]:
    """The pool members (slot -> node, None while unknown) whose node is draining, with its deadline."""
    return {slot: draining[node] for slot, node in member_nodes.items() if node in draining}


def give_up_at(deadline: float, margin_s: float = CALL_MARGIN_S) -> float:
    """When a leaving actor's calls still in flight are given up and run elsewhere: `margin_s` before its node's
    deadline (never, without one)."""
    return deadline - margin_s
