"""Dispatch: a role's work handed to its actors, and every item back exactly once.

`map` spreads items over the members taking work, the least loaded first, at most `max_in_flight` calls on an
actor at a time, and pulls the next item from its iterable only as capacity frees up (back-pressure), so a large
dataset is never all in the object store at once; `submit` hands out every item at once. `broadcast` and `gather`
(`call_all`: both) run one method on every actor. An item whose actor is lost (its call raised: dead or
unreachable; or it hung) is queued again for another, at most `max_attempts` tries in all. Before handing out work and
while waiting for it, dispatch has the membership act on draining nodes (`heed_drains`): an actor on one takes no
new work; what it answers from then on is copied off its node before the node goes, and what it cannot finish before
the node's deadline runs again elsewhere.

Dispatch reaches the actors only through `Members` (pool/membership.py): it never starts, replaces or kills one,
and what becomes of a lost actor is `Members.lose`'s to decide. So it runs the same over the pool's own actors and
over actors someone else started.

Dispatch moves ObjectRefs only. A batch method returns (batch_ref, stats_ref); dispatch waits on the small stats
object, which is also where an actor's death surfaces, and hands the caller the batch ref untouched.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError

from pear_ray.actors.pool.membership import ActorHung, Member, Members

log = logging.getLogger(__name__)


def batch_stats(rows: int, tokens: int, started: float, **extra: Any) -> dict[str, Any]:
    """The small object a pooled method returns beside its batch: what the driver logs and waits on."""
    return {"rows": rows, "tokens": tokens, "seconds": time.perf_counter() - started, **extra}


@dataclass
class DispatchCounts:
    submitted: int = 0  # calls made, re-runs included
    completed: int = 0
    resubmitted: int = 0  # items queued again after their actor was lost
    per_actor_completed: dict[int, int] = field(default_factory=dict)  # by slot
    wait_seconds: float = 0.0  # the caller blocked waiting for the next item of a `map` (what a scaler reads)


@dataclass
class _Work:
    index: int
    item: Any  # an ObjectRef (or small value) passed as the method's first argument
    attempts: int = 0


@dataclass
class Broadcast:
    """One method queued on every actor taking work; `Dispatcher.gather` waits for the results."""

    method: str
    args: tuple
    kwargs: dict
    calls: list[tuple[Member, Any]]  # (member, the call's result ref, or refs)


class Dispatcher:
    """`map` a method over items on a membership's actors, yielding `(index, batch_ref, stats)` as each item
    finishes; `broadcast`/`gather`/`call_all` a method on every actor."""

    def __init__(self, members: Members, *, max_in_flight: int = 2, max_attempts: int = 3):
        self.members = members
        self.max_in_flight = max_in_flight
        self.max_attempts = max_attempts
        self.counts = DispatchCounts()
        # Called on the driver with each item's stats as it comes back, before the next hand-out: where a scaler
        # may grow or shrink the pool mid-map (actors/elastic.py).
        self.on_result: Callable[[dict], None] | None = None

    def map(self, method: str, items: Iterable[Any], **kwargs: Any) -> Iterator[tuple[int, ray.ObjectRef, dict]]:
        return iter(Mapping(self, method, items, kwargs))

    def submit(self, method: str, items: Iterable[Any], **kwargs: Any) -> Mapping:
        """`map` with every item handed to an actor now, past `max_in_flight` (the caller bounds the work: RL's
        next batches), so the actors work on it while the driver does something else; iterate it for the
        results."""
        mapping = Mapping(self, method, items, kwargs)
        mapping.hand_out(eager=True)
        return mapping

    def call_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Run a method on every actor (e.g. a weight update) and wait for all of them. An actor lost meanwhile
        (dead, or hung past call_timeout_s) is dropped or replaced, as its membership decides, and the replacement
        asked again."""
        return self.gather(self.broadcast(method, *args, **kwargs))

    def broadcast(self, method: str, *args: Any, **kwargs: Any) -> Broadcast:
        """`call_all` without the wait: the call is queued on every actor behind the work it has, so work
        submitted after it runs after it; `gather` waits for the results."""
        self.members.heed_drains()
        calls = [(member, self.members.call(member, method, *args, **kwargs)) for member in self.members.working()]
        return Broadcast(method, args, kwargs, calls)

    def gather(self, call: Broadcast) -> list[Any]:
        """A broadcast's results, an actor lost meanwhile dropped or replaced and the replacement asked again."""
        results = []
        for member, result in call.calls:
            try:
                results.append(self.members.get(member, result))
            except (RayActorError, ActorHung) as error:
                if (replacement := self.members.lose(member, error)) is not None:
                    again = self.members.call(replacement, call.method, *call.args, **call.kwargs)
                    results.append(self.members.get(replacement, again))
        return results


class Mapping:
    """One `map` call: its items go to the least-loaded actors as capacity frees up (or all at once), and come back
    as they finish, an item lost with its actor run again on another."""

    def __init__(self, dispatcher: Dispatcher, method: str, items: Iterable[Any], kwargs: dict[str, Any]):
        self.dispatcher, self.members = dispatcher, dispatcher.members
        self.method, self.kwargs = method, kwargs
        self.source = enumerate(items)
        self.retry: deque[_Work] = deque()
        self.pending: dict[ray.ObjectRef, tuple[Member, _Work, ray.ObjectRef]] = {}  # stats ref -> member, ...
        self.exhausted = False

    def hand_out(self, eager: bool = False) -> None:
        """Hand items to actors while they have capacity (every item when `eager`)."""
        # With nothing of its own in flight a mapping takes a slot anyway: another mapping's eager items may hold
        # every slot, and this one could not wait for them to finish.
        self.members.heed_drains()
        while (eager or self._has_capacity() or not self.pending) and (self.retry or not self.exhausted):
            if self.retry:
                work = self.retry.popleft()
            elif (entry := next(self.source, None)) is not None:
                work = _Work(*entry)
            else:
                self.exhausted = True
                return
            member = min(self.members.working(), key=lambda member: member.load)
            batch_ref, stats_ref = self.members.call(member, self.method, work.item, **self.kwargs)
            work.attempts += 1
            self.dispatcher.counts.submitted += 1
            self.pending[stats_ref] = (member, work, batch_ref)

    def refs(self) -> list[ray.ObjectRef]:
        """The batch refs in flight, in item order: every item's after an eager dispatch (an item re-run after
        its actor died gets a new one)."""
        return [batch_ref for _, _, batch_ref in sorted(self.pending.values(), key=lambda entry: entry[1].index)]

    def __iter__(self) -> Iterator[tuple[int, ray.ObjectRef, dict]]:
        counts = self.dispatcher.counts
        while True:
            self.hand_out()
            if not self.pending:
                return
            waiting = time.perf_counter()
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=self.members.next_check())
            counts.wait_seconds += time.perf_counter() - waiting
            if not ready:  # an actor may have hung, its node's deadline be near, or another call found it lost
                for member, error in self.members.overdue() + self._lost_elsewhere():
                    self._run_again(member, None, error)
                continue
            [ready] = ready
            member, work, batch_ref = self.pending.pop(ready)
            if member.leaving_by is not None:  # its node is draining: keep a copy of the batch on the driver's node
                ray.wait([batch_ref], fetch_local=True)
            self.members.answered(member, ready)
            try:
                stats = ray.get(ready)
            except RayActorError as error:  # died or unreachable: its node left, or it was killed
                self._run_again(member, work, error)
                continue
            counts.completed += 1
            counts.per_actor_completed[member.slot] = counts.per_actor_completed.get(member.slot, 0) + 1
            if self.dispatcher.on_result is not None:
                self.dispatcher.on_result(stats)
            yield work.index, batch_ref, stats

    def _lost_elsewhere(self) -> list[tuple[Member, Exception]]:
        """Actors with items of this mapping in flight that another call found lost (a weight sync, another
        mapping): their items run again now rather than when Ray declares the actor dead (a node gone without
        notice: its health checks' timeout, some 30 s)."""
        gone = {member for member, _, _ in self.pending.values()
                if not self.members.current(member) and member not in self.members.leaving}
        return [(member, RuntimeError(f"{self.members.role} actor {member.slot} was found lost by another call"))
                for member in gone]

    def _has_capacity(self) -> bool:
        return any(member.load < self.dispatcher.max_in_flight for member in self.members.working())

    def _run_again(self, member: Member, failed: _Work | None, error: Exception) -> None:
        """Queue again this mapping's unfinished items on a lost actor (the failed one first), then hand the actor
        to its membership. Another mapping may have found it lost already."""
        same_actor = [ref for ref, (other, _, _) in self.pending.items() if other is member]
        lost = ([failed] if failed is not None else []) + [self.pending.pop(ref)[1] for ref in same_actor]
        for work in lost:
            if work.attempts >= self.dispatcher.max_attempts:
                raise RuntimeError(f"item {work.index} failed on {work.attempts} actors; last error: {error}") from error
        self.dispatcher.counts.resubmitted += len(lost)
        self.members.lose(member, error)
        if lost:
            log.warning("re-running %d batches of %s actor %d", len(lost), self.members.role, member.slot)
        self.retry.extend(lost)
