"""Membership: the actors of a pool's role, each in a numbered slot, and whether each is still there.

`Members` is what every membership has, and all that dispatch (pool/dispatch.py) sees of one: the members taking
work, a call to one (in flight on it until answered), hang detection over those calls, and `lose` for a member
found dead or hung. What `lose` does is the membership's own business: `Membership`, over actors the pool starts
itself, replaces a lost actor, or lets it go (elastic, above its minimum), and grows by an actor at a time. A
membership over actors someone else started and the pool must not replace (a learner's ranks) is a sibling whose
`lose` raises, so the caller restarts from a checkpoint.

Hang detection: with `call_timeout_s`, an actor that has calls in flight and has answered none of them for that
long is hung (lost, though perhaps alive). The silence is measured from its last answer, so a queue of batches
answered one after another is no hang, and an actor still starting is not silent.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Member:
    """One actor in its slot. A replacement is a new Member in the same slot, so whoever holds the old one can tell
    that the actor it called is gone (`Members.current`)."""

    slot: int
    actor: Any
    ready: ray.ObjectRef  # resolves once the actor's constructor has run
    active: bool = True  # takes work; an actor added to a running pool waits until activate_started()
    retiring: bool = False  # leaving by plan: no new work; it goes once it has answered every call (release_retired)
    started_at: float = field(default_factory=time.monotonic)
    in_flight: set[ray.ObjectRef] = field(default_factory=set)  # the calls it has not answered (one ref each)
    heard_at: float = field(default_factory=time.monotonic)  # its last answer, or the work it got while idle
    up: bool = False  # seen started by the hang check: until then, and when first seen so, it is not silent

    @property
    def load(self) -> int:
        """The calls sent to it and not answered yet, by every caller."""
        return len(self.in_flight)


class ActorHung(Exception):
    """An actor with work in flight that answered none of it for `call_timeout_s`: lost, though perhaps alive."""

    def __init__(self, silent_s: float):
        super().__init__(f"hung: no answer for {silent_s:.0f} s")


class Members(ABC):
    """A role's actors by slot, the calls in flight on each, and which of them have hung. `role` names the actors
    in the log."""

    def __init__(self, call_timeout_s: float | None, role: str):
        self.slots: dict[int, Member] = {}
        self.call_timeout_s = call_timeout_s
        self.role = role
        self.replaced = 0  # lost actors replaced in their slot
        self.dropped = 0  # lost actors whose slot was let go

    @abstractmethod
    def lose(self, member: Member, error: Exception) -> Member | None:
        """`member` died or hung (`error` says which): deal with it. Returns the member now in its slot, to ask
        again (None: the slot is gone); another caller may have dealt with it already."""

    @abstractmethod
    def shutdown(self) -> None:
        """The pool is done with its members."""

    def working(self) -> list[Member]:
        """The members taking work, in slot order."""
        return [member for member in self.slots.values() if member.active]

    @property
    def actors(self) -> list[Any]:
        """The actors taking work."""
        return [member.actor for member in self.working()]

    def current(self, member: Member) -> bool:
        """The member still holds its slot: not replaced or let go since."""
        return self.slots.get(member.slot) is member

    def call(self, member: Member, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call a method of the member's actor; the call counts as in flight on it until answered."""
        result = getattr(member.actor, method).remote(*args, **kwargs)
        if not member.in_flight:
            member.heard_at = time.monotonic()
        member.in_flight.add(_call_ref(result))
        return result

    def answered(self, member: Member, ref: ray.ObjectRef) -> None:
        """The call `ref` stands for has its answer: the actor was heard from now."""
        member.in_flight.discard(ref)
        member.heard_at = time.monotonic()

    def get(self, member: Member, result: Any) -> Any:
        """`ray.get` one call's result, raising ActorHung once its actor has been silent for call_timeout_s."""
        while True:
            watched = [member] if self.current(member) else []  # else it was killed: no deadline
            try:
                value = ray.get(result, timeout=self.until_deadline(watched))
            except GetTimeoutError:
                if (silent_s := self._silent_s(member)) >= self.call_timeout_s:
                    raise ActorHung(silent_s) from None
                continue
            self.answered(member, _call_ref(result))
            return value

    def until_deadline(self, members: Iterable[Member] | None = None) -> float | None:
        """Seconds until the first of `members` (all, by default) with work in flight has been silent for
        call_timeout_s; None: no deadline."""
        heard = [member.heard_at for member in (self.slots.values() if members is None else members)
                 if member.in_flight]
        if self.call_timeout_s is None or not heard:
            return None
        return max(0.0, min(heard) + self.call_timeout_s - time.monotonic())

    def hung(self) -> list[tuple[Member, ActorHung]]:
        """The members that have had work in flight and answered none of it for call_timeout_s."""
        if self.call_timeout_s is None:
            return []
        return [(member, ActorHung(silent_s)) for member in self.slots.values()
                if member.in_flight and (silent_s := self._silent_s(member)) >= self.call_timeout_s]

    def _silent_s(self, member: Member) -> float:
        """Seconds since the member's actor last answered a call (or got work while idle, or came up), counting the
        answers to calls whose caller has not looked yet."""
        refs = [member.ready, *member.in_flight]
        done = set(ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)[0])
        if not member.up or done & member.in_flight:
            member.in_flight -= done
            member.heard_at = time.monotonic()
        member.up = member.ready in done
        return time.monotonic() - member.heard_at


class Membership(Members):
    """The pool's own actors: `make_actor(slot)` creates (or re-creates) the actor of a slot.

    A lost actor is killed and replaced in its slot; an elastic membership (`min_size` given) lets it go instead
    while it has more than `min_size` actors (its node left the cluster), rather than start a replacement that
    may have nowhere to run. It grows by `add_actor`, one actor at a time that takes work once started, and shrinks
    by `retire`, one actor that finishes its work first.
    """

    def __init__(self, make_actor: Callable[[int], Any], size: int, *, min_size: int | None = None,
                 call_timeout_s: float | None = None, role: str = "rollout"):
        if size < 1:
            raise ValueError(f"a pool needs at least one actor, got size={size}")
        super().__init__(call_timeout_s, role)
        self.make_actor = make_actor
        self.slots.update((slot, self._start(slot, active=True)) for slot in range(size))
        self.min_size = size if min_size is None else min_size

    def _start(self, slot: int, active: bool) -> Member:
        actor = self.make_actor(slot)
        return Member(slot, actor, actor.__ray_ready__.remote(), active)

    def add_actor(self) -> int:
        """Start one more actor (a node joined) without waiting for it; it takes no work until
        `activate_started()` finds it up, so the caller can give it state (weights) first. Returns its slot."""
        slot = max(self.slots, default=-1) + 1
        self.slots[slot] = self._start(slot, active=False)
        return slot

    def activate_started(self, timeout_s: float) -> list[int]:
        """Let the added actors that finished starting take work; drop any that failed to start or did not start
        within `timeout_s` (the room it was meant for is gone). Returns the slots activated."""
        activated = []
        for slot, member in list(self.slots.items()):
            if member.active or member.retiring:
                continue
            done, _ = ray.wait([member.ready], timeout=0)
            try:
                if done:
                    ray.get(member.ready)
                    member.active = True
                    activated.append(slot)
                elif time.monotonic() - member.started_at > timeout_s:
                    raise TimeoutError(f"not started within {timeout_s:.0f} s")
            except (RayActorError, TimeoutError) as error:
                log.warning("new actor %d dropped: %s", slot, error)
                ray.kill(self.slots.pop(slot).actor)
        return activated

    def retire(self, slot: int) -> None:
        """A planned removal: the actor in `slot` takes no new work from now on and leaves once it has answered
        every call it was given (`release_retired`), so none of its work is lost or run twice."""
        member = self.slots[slot]
        member.active, member.retiring = False, True
        log.info("%s actor %d retires: it finishes its %d calls in flight, then leaves", self.role, slot,
                 member.load)

    def release_retired(self) -> list[int]:
        """Kill the retiring actors that have answered every call, and let their slots go. Returns those slots."""
        released = [slot for slot, member in self.slots.items() if member.retiring and not member.in_flight]
        for slot in released:
            ray.kill(self.slots.pop(slot).actor)
            log.info("%s actor %d left the pool: %d actors", self.role, slot, len(self.actors))
        return released

    def settled(self) -> bool:
        """Every actor has started (so the cluster's free resources no longer count ones about to be taken)."""
        refs = [member.ready for member in self.slots.values()]
        return len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) == len(refs)

    def lose(self, member: Member, error: Exception) -> Member | None:
        """Kill a lost actor and let its slot go (retiring, or elastic above minimum) or start a new actor in it."""
        if not self.current(member):
            return self.slots.get(member.slot)
        ray.kill(member.actor)  # hung, or unreachable rather than dead (a node cut off): it must go
        cause = error if isinstance(error, ActorHung) else type(error).__name__
        if member.retiring or len(self.actors) > self.min_size:
            del self.slots[member.slot]
            self.dropped += 1
            log.warning("%s actor %d lost (%s); going on with %d actors", self.role, member.slot, cause,
                        len(self.actors))
            return None
        log.warning("%s actor %d lost (%s); replacing it", self.role, member.slot, cause)
        self.slots[member.slot] = self._start(member.slot, active=True)
        self.replaced += 1
        return self.slots[member.slot]

    def shutdown(self) -> None:
        for member in self.slots.values():
            ray.kill(member.actor)
        self.slots.clear()


def _call_ref(result: Any) -> ray.ObjectRef:
    """The ref that stands for a call: its only return, or its last (a batch method's stats)."""
    return result[-1] if isinstance(result, list) else result
