"""Elastic pools on an autoscaled cluster: what one rollout actor occupies, asking the autoscaler for room for some
(ray.autoscaler.sdk.request_resources; a no-op on a cluster without one), growing a pool onto room that appeared,
and `PoolScaler`, which sizes a pool for one phase as `resources.rollout.scale` says.

    scale.by max   RL asks for room for max_actors for the whole stage and grows whenever there is room (score and
                   eval keep num_actors)
    scale.by wait  each phase's pool asks for one actor's room more or releases one as what the phase waits on
                   says (the rule: actors/scaling.py); RL judges once per step, score and eval once per batch the
                   pool returns

Either way a phase withdraws its request when it ends, so the autoscaler removes the nodes that went idle. A node
holding a batch someone still refers to is not idle, so a released actor's last batches outlive it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import ray
from ray.autoscaler.sdk import request_resources

from pear_ray.actors.pool import ActorPool
from pear_ray.actors.scaling import scale_target
from pear_ray.config import RolloutResources

log = logging.getLogger(__name__)


def rollout_bundle(resources: RolloutResources) -> dict[str, float]:
    """What one rollout actor occupies."""
    bundle = {"CPU": resources.num_cpus, "GPU": resources.num_gpus, **resources.resources}
    return {name: amount for name, amount in bundle.items() if amount > 0}


def request_rollout_capacity(resources: RolloutResources, actors: int) -> None:
    """Ask the autoscaler for room for `actors` rollout actors in all (0 withdraws the request, so it can scale the
    rollout nodes back down); a no-op on a cluster without an autoscaler."""
    request_resources(bundles=[rollout_bundle(resources)] * actors)


def grow_rollout_pool(pool: ActorPool, resources: RolloutResources, ceiling: int | None = None,
                      start_timeout_s: float = 300.0) -> list[int]:
    """Elastic pools: start one more rollout actor when the cluster has room for it (a node joined), up to `ceiling`
    actors (default: max_actors), without waiting for it to come up. Returns the slots of actors that have come up
    since the last call: they take work from now on, and still hold the weights they started with.

    One actor starts at a time, and only once every other one has started: until then the cluster's free
    resources still count what a starting actor is about to take. A pool shrinks without a call when a node leaves
    (the actor is lost), and by plan through `ActorPool.retire`.
    """
    started = pool.activate_started(start_timeout_s)
    for slot in started:
        log.info("%s actor %d is up: the pool has %d actors", pool.members.role, slot, len(pool.actors))
    ceiling = resources.max_actors if ceiling is None else ceiling
    if (len(pool.slots) < (ceiling or 0) and pool.settled()  # the cheap checks first: once per step
            and _fits(rollout_bundle(resources), ray.available_resources())):
        log.info("the cluster has room for another %s actor: starting actor %d", pool.members.role, pool.add_actor())
    return started


def _fits(bundle: dict[str, float], available: dict[str, float]) -> bool:
    return all(available.get(name, 0.0) >= amount for name, amount in bundle.items())


def nodes_up() -> int:
    """The cluster's live nodes."""
    return sum(node["Alive"] for node in ray.nodes())


class PoolScaler:
    """Sizes an elastic pool for one phase (`phase`: score, rl, eval) between num_actors and max_actors.

    `grow()` each step starts the actors asked for as room appears; `decide(wait_share,
    busy_share)` after each step records what the step waited on and, with scale.by=wait, asks the autoscaler for one
    actor's room more or releases one actor (it finishes its work, then leaves); `close()` withdraws the request. RL
    calls them once per step (`observe` adds the step's figures); score and eval, through `on_result`, once per
    batch the pool returns. `scale_up_seconds` holds, for each actor that came up, the seconds from
    the request for its room to its taking work.
    """

    def __init__(self, pool: ActorPool, resources: RolloutResources, phase: str):
        self.pool, self.resources, self.phase = pool, resources, phase
        self.by_wait = resources.scale.by == "wait"
        self.requested = len(pool.slots) if self.by_wait else resources.max_actors
        now = time.monotonic()
        self.asked_at = {size: now for size in range(len(pool.slots) + 1, self.requested + 1)}  # room for the n-th
        self.waits: list[float] = []  # the steps since the last change: the consumer's wait share of each
        self.busy: list[float] = []  # and the pool's busy share
        self.scale_up_seconds: list[float] = []
        self.reported = 0  # scale-ups already in a step's figures
        self.peak = len(pool.actors)
        self.result_at, self.result_waited = time.perf_counter(), pool.dispatcher.counts.wait_seconds  # on_result
        request_rollout_capacity(resources, self.requested)

    def grow(self) -> list[int]:
        """Start one more actor if one is asked for and there is room; returns the slots of actors that came up (they
        take work now)."""
        came_up = grow_rollout_pool(self.pool, self.resources, self.requested)
        now, size = time.monotonic(), len(self.pool.actors)
        for nth in range(size - len(came_up) + 1, size + 1):
            if nth in self.asked_at:
                self.scale_up_seconds.append(now - self.asked_at.pop(nth))
        self.peak = max(self.peak, size)
        if came_up:
            self.waits, self.busy = [], []  # another size: judged by the steps that follow
        return came_up

    def decide(self, wait_share: float, busy_share: float) -> None:
        """One step's wait and busy shares; with scale.by=wait, the rule's decision is acted on."""
        if not self.by_wait:
            return
        self.waits.append(wait_share)
        self.busy.append(busy_share)
        target = scale_target(self.waits, self.busy, size=len(self.pool.actors), requested=self.requested,
                              low=self.resources.num_actors, high=self.resources.max_actors, rule=self.resources.scale)
        if target == self.requested:
            return
        log.info("%s: the %s pool's consumer waited %.0f%% of the last step, its actors were busy %.0f%%: asking for "
                 "room for %d actors (was %d; %d working)", self.phase, self.pool.members.role, 100 * wait_share,
                 100 * busy_share, target, self.requested, len(self.pool.actors))
        now = time.monotonic()
        self.asked_at = {nth: at for nth, at in self.asked_at.items() if nth <= target}
        self.asked_at.update((nth, now) for nth in range(self.requested + 1, target + 1))
        while len(self.pool.actors) > target:  # the newest goes first
            self.pool.retire(self.pool.members.working()[-1].slot)
        self.requested = target
        request_rollout_capacity(self.resources, target)
        self.waits, self.busy = [], []

    def observe(self, wait_share: float, busy_share: float) -> dict[str, float]:
        """`decide`, then the step's figures: the actors room is asked for, the nodes up, the wait share that was
        judged, and the seconds from request to work of the actors that came up since the last step."""
        self.decide(wait_share, busy_share)
        figures = {"rollout_requested": self.requested, "nodes_up": nodes_up(), "rollout_wait_share": wait_share}
        if new := self.scale_up_seconds[self.reported:]:
            figures["rollout_scale_up_seconds"] = max(new)
            self.reported = len(self.scale_up_seconds)
        return figures

    def on_result(self, stats: dict) -> None:
        """Score and eval: each batch the pool returns is a step. Its wait share: the part of the time since the last
        batch that the driver spent waiting on the pool; its busy share: the batch's actor-seconds over the pool's."""
        now, waited = time.perf_counter(), self.pool.dispatcher.counts.wait_seconds
        seconds = max(now - self.result_at, 1e-6)
        self.decide(min((waited - self.result_waited) / seconds, 1.0),
                    min(stats["seconds"] / (max(len(self.pool.actors), 1) * seconds), 1.0))
        self.result_at, self.result_waited = now, waited
        self.grow()

    def close(self) -> None:
        """The phase is over: withdraw the request, so idle nodes go."""
        request_rollout_capacity(self.resources, 0)
        if self.peak > self.resources.num_actors:
            log.info("%s: the %s pool peaked at %d actors; %s s from request to work", self.phase,
                     self.pool.members.role, self.peak, "/".join(f"{s:.1f}" for s in self.scale_up_seconds) or "-")


@contextmanager
def scaled_by_results(pool: ActorPool, resources: RolloutResources, phase: str) -> Iterator[PoolScaler | None]:
    """Score and eval, with scale.by=wait: the pool is sized as its results come back (PoolScaler.on_result), and
    the request is withdrawn at the end. Otherwise the pool keeps its size."""
    if resources.max_actors is None or resources.scale.by != "wait":
        yield None
        return
    scaler = PoolScaler(pool, resources, phase)
    pool.dispatcher.on_result = scaler.on_result
    try:
        yield scaler
    finally:
        pool.dispatcher.on_result = None
        scaler.close()
