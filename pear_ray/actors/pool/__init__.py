"""The actor pool: a role's actors (rollout, scoring, reference) and the work handed to them, so that the work
survives an actor dying or hanging and every batch comes back exactly once. Two parts, each readable alone:

  membership.py  which actors the role has: starting them, replacing a lost one (dead, or hung: alive but silent
                 past `call_timeout_s`), growing and shrinking an elastic pool, an actor leaving its slot (retired by
                 plan, or its node draining: it finishes its calls in flight, then goes); the calls in flight on each
                 actor and hang detection over them
  dispatch.py    the work: `map`/`submit` with back-pressure, `broadcast`/`gather`, an item lost with its actor
                 run again on another

Dispatch sees membership only through `Members`, so a membership over actors the pool did not start (and must
not replace) can serve it too. `ActorPool` is the two together over actors the pool starts itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import ray

from pear_ray.actors.pool.dispatch import Broadcast, DispatchCounts, Dispatcher, Mapping, batch_stats
from pear_ray.actors.pool.membership import ActorHung, Member, Members, Membership, NodeDraining


@dataclass
class PoolStats(DispatchCounts):
    actors_replaced: int = 0
    actors_dropped: int = 0
    actors_drained: int = 0  # of those replaced or dropped: the ones that left as their node drained


class ActorPool:
    """`map` a method over items on a role's actors (`members`), yielding `(index, batch_ref, stats)` as each item
    finishes. At most `max_in_flight` items are queued per actor; items are pulled from the iterable only as
    capacity frees up (back-pressure), so a large dataset is never all in the object store at once. An item whose
    actor is lost runs again on another, at most `max_attempts` times."""

    def __init__(self, members: Members, *, max_in_flight: int = 2, max_attempts: int = 3):
        self.members = members
        self.dispatcher = Dispatcher(members, max_in_flight=max_in_flight, max_attempts=max_attempts)

    @classmethod
    def start(cls, make_actor: Callable[[int], Any], size: int, *, max_in_flight: int = 2, max_attempts: int = 3,
              min_size: int | None = None, call_timeout_s: float | None = None, role: str = "rollout") -> ActorPool:
        """A pool of `size` actors of its own: `make_actor(slot)` creates (or re-creates) the actor of a slot.

        With `call_timeout_s`, an actor that has work in flight and has answered none of the pool's calls for that
        long (measured from its last answer, so a queue of batches answered one after another is no hang; an actor
        still starting is not silent) is killed and treated as lost. A lost actor is replaced, or, with `min_size`
        given (an elastic pool), let go while the pool has more than `min_size` actors. `role` names the actors in
        the log."""
        members = Membership(make_actor, size, min_size=min_size, call_timeout_s=call_timeout_s, role=role)
        return cls(members, max_in_flight=max_in_flight, max_attempts=max_attempts)

    @property
    def slots(self) -> dict[int, Member]:
        """Every actor by slot, the ones still starting included."""
        return self.members.slots

    @property
    def actors(self) -> list[Any]:
        """The actors taking work."""
        return self.members.actors

    @property
    def call_timeout_s(self) -> float | None:
        return self.members.call_timeout_s

    @property
    def stats(self) -> PoolStats:
        """The counts so far (a copy)."""
        return PoolStats(**asdict(self.dispatcher.counts), actors_replaced=self.members.replaced,
                         actors_dropped=self.members.dropped, actors_drained=self.members.drained)

    def map(self, method: str, items: Iterable[Any], **kwargs: Any) -> Iterator[tuple[int, ray.ObjectRef, dict]]:
        return self.dispatcher.map(method, items, **kwargs)

    def submit(self, method: str, items: Iterable[Any], **kwargs: Any) -> Mapping:
        return self.dispatcher.submit(method, items, **kwargs)

    def call_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return self.dispatcher.call_all(method, *args, **kwargs)

    def broadcast(self, method: str, *args: Any, **kwargs: Any) -> Broadcast:
        return self.dispatcher.broadcast(method, *args, **kwargs)

    def gather(self, call: Broadcast) -> list[Any]:
        return self.dispatcher.gather(call)

    def add_actor(self) -> int:
        return self.members.add_actor()

    def activate_started(self, timeout_s: float) -> list[int]:
        return self.members.activate_started(timeout_s)

    def settled(self) -> bool:
        return self.members.settled()

    def retire(self, slot: int) -> None:
        self.members.retire(slot)

    def shutdown(self) -> None:
        self.members.shutdown()


__all__ = ["ActorHung", "ActorPool", "Broadcast", "Dispatcher", "Mapping", "Member", "Members", "Membership",
           "NodeDraining", "PoolStats", "batch_stats"]
