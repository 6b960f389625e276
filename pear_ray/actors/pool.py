"""A pool of rollout/scoring actors: balances batches across actors, bounds the work in flight, and survives an
actor dying, or hanging (alive but silent past `call_timeout_s`), by replacing it and re-running its unfinished
batches, so every batch comes back exactly once.

The pool moves ObjectRefs only. Each call returns (batch_ref, stats_ref); the pool waits on the small stats
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
from ray.exceptions import GetTimeoutError, RayActorError

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    actor: Any
    ready: ray.ObjectRef  # resolves once the actor's constructor has run
    active: bool = True  # takes work; an actor added to a running pool waits until activate_started()
    started_at: float = field(default_factory=time.monotonic)
    in_flight: set[ray.ObjectRef] = field(default_factory=set)  # the calls it has not answered (one ref each)
    heard_at: float = field(default_factory=time.monotonic)  # its last answer, or the work it got while idle
    up: bool = False  # seen started by the hang check: until then, and when first seen so, it is not silent


@dataclass
class _Work:
    index: int
    item: Any  # an ObjectRef (or small value) passed as the method's first argument
    attempts: int = 0


@dataclass
class _Broadcast:
    method: str
    args: tuple
    kwargs: dict
    refs: dict[int, tuple[Any, Any]]  # slot -> (actor, the call's result ref, or refs)


class ActorHung(Exception):
    """An actor with work in flight that answered none of it for `call_timeout_s`: lost, though perhaps alive."""

    def __init__(self, silent_s: float):
        super().__init__(f"hung: no answer for {silent_s:.0f} s")


@dataclass
class PoolStats:
    submitted: int = 0
    completed: int = 0
    resubmitted: int = 0
    actors_replaced: int = 0
    actors_dropped: int = 0
    per_actor_completed: dict[int, int] = field(default_factory=dict)


def batch_stats(rows: int, tokens: int, started: float, **extra: Any) -> dict[str, Any]:
    """The small object a pooled method returns beside its batch: what the driver logs and waits on."""
    return {"rows": rows, "tokens": tokens, "seconds": time.perf_counter() - started, **extra}


class ActorPool:
    """`map` a method over items on N actors, yielding `(index, batch_ref, stats)` as each item finishes.

    `make_actor(slot)` creates (or re-creates) the actor of a slot. At most `max_in_flight` items are queued
    per actor; items are pulled from the iterable only as capacity frees up (back-pressure), so a large
    dataset is never all in the object store at once.

    With `call_timeout_s`, an actor that has work in flight and has answered none of the pool's calls for that
    long (measured from its last answer, so a queue of batches answered one after another is no hang; an actor
    still starting is not silent) is killed and treated as lost. `role` names the actors in the log.
    """

    def __init__(self, make_actor: Callable[[int], Any], size: int, *, max_in_flight: int = 2, max_attempts: int = 3,
                 min_size: int | None = None, call_timeout_s: float | None = None, role: str = "rollout"):
        if size < 1:
            raise ValueError(f"a pool needs at least one actor, got size={size}")
        self.make_actor = make_actor
        self.slots = {slot: self._new_slot(slot, active=True) for slot in range(size)}
        self.max_in_flight = max_in_flight
        self.max_attempts = max_attempts
        # Elastic pools (min_size given) let a lost actor go while above min_size (its node left the cluster)
        # instead of starting a replacement that may have nowhere to run.
        self.min_size = size if min_size is None else min_size
        self.call_timeout_s = call_timeout_s
        self.role = role
        self.stats = PoolStats()

    def _new_slot(self, slot_id: int, active: bool) -> _Slot:
        actor = self.make_actor(slot_id)
        return _Slot(actor, actor.__ray_ready__.remote(), active)

    def add_actor(self) -> int:
        """Start one more actor (a node joined) without waiting for it; it takes no work until
        `activate_started()` finds it up, so the caller can give it state (weights) first. Returns its slot."""
        slot_id = max(self.slots, default=-1) + 1
        self.slots[slot_id] = self._new_slot(slot_id, active=False)
        return slot_id

    def activate_started(self, timeout_s: float) -> list[int]:
        """Let the added actors that finished starting take work; drop any that failed to start or did not start
        within `timeout_s` (the room it was meant for is gone). Returns the slots activated."""
        activated = []
        for slot_id, slot in list(self.slots.items()):
            if slot.active:
                continue
            done, _ = ray.wait([slot.ready], timeout=0)
            try:
                if done:
                    ray.get(slot.ready)
                    slot.active = True
                    activated.append(slot_id)
                elif time.monotonic() - slot.started_at > timeout_s:
                    raise TimeoutError(f"not started within {timeout_s:.0f} s")
            except (RayActorError, TimeoutError) as error:
                log.warning("new actor %d dropped: %s", slot_id, error)
                ray.kill(self.slots.pop(slot_id).actor)
        return activated

    def settled(self) -> bool:
        """Every actor has started (so the cluster's free resources no longer count ones about to be taken)."""
        refs = [slot.ready for slot in self.slots.values()]
        return len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) == len(refs)

    @property
    def actors(self) -> list[Any]:
        """The actors taking work."""
        return [slot.actor for slot in self.slots.values() if slot.active]

    def map(self, method: str, items: Iterable[Any], **kwargs: Any) -> Iterator[tuple[int, ray.ObjectRef, dict]]:
        return iter(_Mapping(self, method, items, kwargs))

    def submit(self, method: str, items: Iterable[Any], **kwargs: Any) -> _Mapping:
        """`map` with every item handed to an actor now, past `max_in_flight` (the caller bounds the work: RL's
        next batches), so the actors work on it while the driver does something else; iterate it for the
        results."""
        mapping = _Mapping(self, method, items, kwargs)
        mapping.dispatch(eager=True)
        return mapping

    def call_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Run a method on every actor (e.g. a weight update) and wait for all of them. An actor lost meanwhile
        (dead, or hung past call_timeout_s) is dropped (elastic pool above its minimum) or replaced and asked
        again."""
        return self.gather(self.broadcast(method, *args, **kwargs))

    def broadcast(self, method: str, *args: Any, **kwargs: Any) -> _Broadcast:
        """`call_all` without the wait: the call is queued on every actor behind the work it has, so work
        submitted after it runs after it; `gather` waits for the results."""
        refs = {slot_id: (slot.actor, self._send(slot_id, method, *args, **kwargs))
                for slot_id, slot in self.slots.items() if slot.active}
        return _Broadcast(method, args, kwargs, refs)

    def gather(self, call: _Broadcast) -> list[Any]:
        """A broadcast's results, an actor lost meanwhile dropped or replaced and asked again."""
        results = []
        for slot_id, (actor, result) in call.refs.items():
            try:
                results.append(self._get(slot_id, actor, result))
            except (RayActorError, ActorHung) as error:
                self._replace(slot_id, actor, None, {}, error)
                if slot_id in self.slots:
                    actor = self.slots[slot_id].actor
                    results.append(self._get(slot_id, actor, self._send(slot_id, call.method, *call.args,
                                                                        **call.kwargs)))
        return results

    def shutdown(self) -> None:
        for slot in self.slots.values():
            ray.kill(slot.actor)
        self.slots.clear()

    def _next(self, source) -> _Work | None:
        try:
            index, item = next(source)
        except StopIteration:
            return None
        return _Work(index, item)

    def _has_capacity(self) -> bool:
        return any(slot.active and len(slot.in_flight) < self.max_in_flight for slot in self.slots.values())

    def _least_loaded(self) -> int:
        return min((slot_id for slot_id, slot in self.slots.items() if slot.active),
                   key=lambda slot_id: len(self.slots[slot_id].in_flight))

    def _send(self, slot_id: int, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call a method of the slot's actor; the call counts as in flight on it until answered."""
        slot = self.slots[slot_id]
        result = getattr(slot.actor, method).remote(*args, **kwargs)
        if not slot.in_flight:
            slot.heard_at = time.monotonic()
        slot.in_flight.add(_call_ref(result))
        return result

    def _answered(self, slot_id: int, actor: Any, ref: ray.ObjectRef) -> None:
        slot = self.slots.get(slot_id)
        if slot is not None and slot.actor is actor:
            slot.in_flight.discard(ref)
            slot.heard_at = time.monotonic()

    def _get(self, slot_id: int, actor: Any, result: Any) -> Any:
        """`ray.get` one call's result, raising ActorHung once its actor has been silent for call_timeout_s."""
        while True:
            slot = self.slots.get(slot_id)
            watched = [slot] if slot is not None and slot.actor is actor else []  # else it was killed: no deadline
            try:
                value = ray.get(result, timeout=self._until_deadline(watched))
            except GetTimeoutError:
                if (silent_s := self._silent_s(slot)) >= self.call_timeout_s:
                    raise ActorHung(silent_s) from None
                continue
            self._answered(slot_id, actor, _call_ref(result))
            return value

    def _until_deadline(self, slots: Iterable[_Slot]) -> float | None:
        """Seconds until the first of `slots` with work in flight has been silent for call_timeout_s; None: no
        deadline."""
        heard = [slot.heard_at for slot in slots if slot.in_flight]
        if self.call_timeout_s is None or not heard:
            return None
        return max(0.0, min(heard) + self.call_timeout_s - time.monotonic())

    def _silent_s(self, slot: _Slot) -> float:
        """Seconds since the slot's actor last answered a call (or got work while idle, or came up), counting the
        answers to calls whose caller has not looked yet."""
        refs = [slot.ready, *slot.in_flight]
        done = set(ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)[0])
        if not slot.up or done & slot.in_flight:
            slot.in_flight -= done
            slot.heard_at = time.monotonic()
        slot.up = slot.ready in done
        return time.monotonic() - slot.heard_at

    def _hung(self) -> list[tuple[int, Any, float]]:
        """(slot, actor, silent seconds) of the actors that have had work in flight and answered none of it for
        call_timeout_s."""
        if self.call_timeout_s is None:
            return []
        return [(slot_id, slot.actor, silent_s) for slot_id, slot in self.slots.items()
                if slot.in_flight and (silent_s := self._silent_s(slot)) >= self.call_timeout_s]

    def _replace(self, slot_id: int, actor: Any, failed: _Work | None, pending: dict, error: Exception) -> list[_Work]:
        """Drop a lost actor's slot (elastic, above minimum) or start a new actor in it; return the lost actor's
        unfinished work of this call (the failed item first). Another mapping may have replaced it already."""
        same_actor = [ref for ref, (_, other, _, _) in pending.items() if other is actor]
        lost = ([failed] if failed is not None else []) + [pending.pop(ref)[2] for ref in same_actor]
        for work in lost:
            if work.attempts >= self.max_attempts:
                raise RuntimeError(f"item {work.index} failed on {work.attempts} actors; last error: {error}") from error
        self.stats.resubmitted += len(lost)
        if slot_id not in self.slots or self.slots[slot_id].actor is not actor:
            return lost
        ray.kill(self.slots[slot_id].actor)  # hung, or unreachable rather than dead (a node cut off): it must go
        cause = error if isinstance(error, ActorHung) else type(error).__name__
        if len(self.actors) > self.min_size:
            log.warning("%s actor %d lost (%s); going on with %d actors, re-running its %d batches",
                        self.role, slot_id, cause, len(self.actors) - 1, len(lost))
            del self.slots[slot_id]
            self.stats.actors_dropped += 1
            return lost
        log.warning("%s actor %d lost (%s); replacing it and re-running %d batches", self.role, slot_id, cause,
                    len(lost))
        self.slots[slot_id] = self._new_slot(slot_id, active=True)
        self.stats.actors_replaced += 1
        return lost


class _Mapping:
    """One `map` call: its items go to the least-loaded actors as capacity frees up (or all at once), and come back
    as they finish, an item lost with its actor re-run on another."""

    def __init__(self, pool: ActorPool, method: str, items: Iterable[Any], kwargs: dict[str, Any]):
        self.pool, self.method, self.kwargs = pool, method, kwargs
        self.source = enumerate(items)
        self.retry: deque[_Work] = deque()
        self.pending: dict[ray.ObjectRef, tuple[int, Any, _Work, ray.ObjectRef]] = {}  # stats ref -> slot, actor..
        self.exhausted = False

    def dispatch(self, eager: bool = False) -> None:
        """Hand items to actors while they have capacity (every item when `eager`)."""
        pool = self.pool
        # With nothing of its own in flight a mapping takes a slot anyway: another mapping's eager items may hold
        # every slot, and this one could not wait for them to finish.
        while (eager or pool._has_capacity() or not self.pending) and (self.retry or not self.exhausted):
            work = self.retry.popleft() if self.retry else pool._next(self.source)
            if work is None:
                self.exhausted = True
                return
            slot_id = pool._least_loaded()
            actor = pool.slots[slot_id].actor
            batch_ref, stats_ref = pool._send(slot_id, self.method, work.item, **self.kwargs)
            work.attempts += 1
            pool.stats.submitted += 1
            self.pending[stats_ref] = (slot_id, actor, work, batch_ref)

    def refs(self) -> list[ray.ObjectRef]:
        """The batch refs in flight, in item order: every item's after an eager dispatch (an item re-run after
        its actor died gets a new one)."""
        return [batch_ref for _, _, _, batch_ref in sorted(self.pending.values(), key=lambda entry: entry[2].index)]

    def __iter__(self) -> Iterator[tuple[int, ray.ObjectRef, dict]]:
        pool = self.pool
        while True:
            self.dispatch()
            if not self.pending:
                return
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=pool._until_deadline(pool.slots.values()))
            if not ready:  # an actor may have hung
                for slot_id, actor, silent_s in pool._hung():
                    self.retry.extend(pool._replace(slot_id, actor, None, self.pending, ActorHung(silent_s)))
                continue
            [ready] = ready
            slot_id, actor, work, batch_ref = self.pending.pop(ready)
            pool._answered(slot_id, actor, ready)
            try:
                stats = ray.get(ready)
            except RayActorError as error:  # died or unreachable: its node left, or it was killed
                self.retry.extend(pool._replace(slot_id, actor, work, self.pending, error))
                continue
            pool.stats.completed += 1
            pool.stats.per_actor_completed[slot_id] = pool.stats.per_actor_completed.get(slot_id, 0) + 1
            yield work.index, batch_ref, stats


def _call_ref(result: Any) -> ray.ObjectRef:
    """The ref that stands for a call: its only return, or its last (a batch method's stats)."""
    return result[-1] if isinstance(result, list) else result
