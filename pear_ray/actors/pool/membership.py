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

Draining nodes (a preemption notice, actors/draining.py): `Membership` asks which nodes are draining whenever
dispatch hands out or waits for work. A member on one leaves its slot at once (a new actor starts in it, or an elastic
pool above its minimum lets the slot go) and takes no new work; it finishes its calls in flight, then goes, or, if its
node's deadline comes first, its calls are given up and run elsewhere like a lost actor's.
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

from pear_ray.actors.draining import DrainWatch, give_up_at, leaving_members, node_of

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Member:
    """One actor in its slot. A replacement is a new Member in the same slot, so whoever holds the old one can tell
    that the actor it called is gone (`Members.current`)."""

    slot: int
    actor: Any
    ready: ray.ObjectRef  # resolves once the actor's constructor has run (to its node's id, for a pool's own actors)
    active: bool = True  # takes work; an actor added to a running pool waits until activate_started()
    node: str | None = None  # the id of the node it runs on, once known (a pool's own actors)
    leaving_by: float | None = None  # its node is draining: it left its slot, and its calls are given up at this
    # Unix time (None while it holds a slot, or when it retired by plan: no deadline)
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


class NodeDraining(Exception):
    """An actor whose node is about to go, with work in flight that it could not finish before the node's deadline."""

    def __init__(self):
        super().__init__("its node is draining and its deadline is near")


class Members(ABC):
    """A role's actors by slot, the calls in flight on each, and which of them have hung. `role` names the actors
    in the log."""

    def __init__(self, call_timeout_s: float | None, role: str):
        self.slots: dict[int, Member] = {}
        self.leaving: list[Member] = []  # members that left their slot (retired, or their node drains) until they go
        self.call_timeout_s = call_timeout_s
        self.role = role
        self.replaced = 0  # lost actors replaced in their slot
        self.dropped = 0  # lost actors whose slot was let go
        self.drained = 0  # actors that left their slot as their node drained (counted in replaced or dropped too)

    @abstractmethod
    def lose(self, member: Member, error: Exception) -> Member | None:
        """`member` died or hung (`error` says which): deal with it. Returns the member now in its slot, to ask
        again (None: the slot is gone); another caller may have dealt with it already."""

    @abstractmethod
    def shutdown(self) -> None:
        """The pool is done with its members."""

    @abstractmethod
    def heed_drains(self) -> None:
        """Act on the nodes marked draining (a preemption notice): asked before work is handed out and while it is
        waited for."""

    def next_check(self) -> float | None:
        """Seconds a wait for answers may last before `overdue` and `heed_drains` should be asked again (None:
        until an answer comes)."""
        return self.until_deadline()

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
        heard = [member.heard_at for member in (self._everyone() if members is None else members)
                 if member.in_flight]
        if self.call_timeout_s is None or not heard:
            return None
        return max(0.0, min(heard) + self.call_timeout_s - time.monotonic())

    def overdue(self) -> list[tuple[Member, Exception]]:
        """The members whose calls in flight are to be given up and run elsewhere: those leaving a draining node whose
        deadline is near, and those that answered none of them for call_timeout_s (hung)."""
        now = time.time()
        found = {member: NodeDraining() for member in self.leaving
                 if member.in_flight and member.leaving_by is not None and now >= member.leaving_by}
        if self.call_timeout_s is not None:
            found |= {member: ActorHung(silent_s) for member in self._everyone() if member not in found
                      and member.in_flight and (silent_s := self._silent_s(member)) >= self.call_timeout_s}
        return list(found.items())

    def _everyone(self) -> list[Member]:
        return [*self.slots.values(), *self.leaving]

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
    by `retire`. An actor retired, or whose node is draining (`heed_drains`: its slot is then vacated as a lost
    actor's), leaves its slot at once and finishes its calls in flight before it goes.
    """

    def __init__(self, make_actor: Callable[[int], Any], size: int, *, min_size: int | None = None,
                 call_timeout_s: float | None = None, role: str = "rollout"):
        if size < 1:
            raise ValueError(f"a pool needs at least one actor, got size={size}")
        super().__init__(call_timeout_s, role)
        self.make_actor = make_actor
        self.drains = DrainWatch()
        self.slots.update((slot, self._start(slot, active=True)) for slot in range(size))
        self.min_size = size if min_size is None else min_size

    def _start(self, slot: int, active: bool) -> Member:
        actor = self.make_actor(slot)
        return Member(slot, actor, node_of(actor), active)

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
            if member.active:
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

    def settled(self) -> bool:
        """Every actor has started (so the cluster's free resources no longer count ones about to be taken)."""
        refs = [member.ready for member in self.slots.values()]
        return len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) == len(refs)

    def lose(self, member: Member, error: Exception) -> Member | None:
        """Kill a lost actor and let its slot go (elastic, above minimum) or start a new actor in it."""
        if member in self.leaving:  # its node went before it finished, or its deadline came
            self._let_go(member)
        if not self.current(member):
            return self.slots.get(member.slot)
        ray.kill(member.actor)  # hung, or unreachable rather than dead (a node cut off): it must go
        cause = error if isinstance(error, ActorHung) else type(error).__name__
        return self._vacate(member, f"lost ({cause})")

    def _vacate(self, member: Member, why: str) -> Member | None:
        """Let a member's slot go (elastic above minimum, or an added actor not at work yet) or start a new actor in
        it; returns the slot's new member."""
        if not member.active or len(self.actors) > self.min_size:
            log.warning("%s actor %d %s; going on with %d actors", self.role, member.slot, why,
                        len(self.actors) - member.active)
            del self.slots[member.slot]
            self.dropped += 1
            return None
        log.warning("%s actor %d %s; replacing it", self.role, member.slot, why)
        self.slots[member.slot] = self._start(member.slot, active=True)
        self.replaced += 1
        return self.slots[member.slot]

    def heed_drains(self) -> None:
        """Members whose node is draining leave their slots (`_vacate`): they take no new work, finish their calls in
        flight and go; ones with none go now."""
        draining = self.drains()
        if not draining:
            return
        nodes = {slot: self._node(member) for slot, member in self.slots.items()}
        for slot, deadline in leaving_members(draining, nodes).items():
            member = self.slots[slot]
            self.drained += 1
            self._vacate(member, f"is on a draining node ({member.load} calls to finish there)")
            self._leave(member, give_up_at(deadline))

    def retire(self, slot: int) -> None:
        """A planned removal: the actor in `slot` leaves its slot and takes no new work from now on; it goes once it
        has answered every call it was given, so none of its work is lost or run twice."""
        member = self.slots.pop(slot)
        log.info("%s actor %d retires: it finishes its %d calls in flight, then leaves", self.role, slot,
                 member.load)
        self._leave(member, None)

    def _leave(self, member: Member, deadline: float | None) -> None:
        """A member out of its slot finishes its calls in flight (given up at `deadline`, if any), then goes."""
        member.leaving_by = deadline
        self.leaving.append(member)
        if not member.in_flight:
            self._let_go(member)

    def answered(self, member: Member, ref: ray.ObjectRef) -> None:
        super().answered(member, ref)
        if member in self.leaving and not member.in_flight:  # its last call: its node may go
            self._let_go(member)

    def next_check(self) -> float | None:
        """Waits end at the next hang deadline, a leaving member's deadline, or the next look at the draining
        nodes."""
        now = time.time()
        times = [self.until_deadline(), self.drains.poll_s,
                 *(member.leaving_by - now for member in self.leaving if member.leaving_by is not None)]
        return max(0.0, min(seconds for seconds in times if seconds is not None))

    def _node(self, member: Member) -> str | None:
        """The id of the node the member's actor runs on; None until it has started (or if it failed to)."""
        if member.node is None and ray.wait([member.ready], timeout=0)[0]:
            try:
                member.node = ray.get(member.ready)
            except RayActorError:
                pass  # found lost when it is next called
        return member.node

    def _let_go(self, member: Member) -> None:
        ray.kill(member.actor)
        self.leaving.remove(member)
        log.info("%s actor %d left the pool: %d actors", self.role, member.slot, len(self.actors))

    def shutdown(self) -> None:
        for member in self._everyone():
            ray.kill(member.actor)
        self.slots.clear()
        self.leaving.clear()


def _call_ref(result: Any) -> ray.ObjectRef:
    """The ref that stands for a call: its only return, or its last (a batch method's stats)."""
    return result[-1] if isinstance(result, list) else result
