"""Calls of user code that may raise, hang or crash, run one after another in a forked child process, each under a
deadline: what verifiers (tasks/verify.py) and environment steps (environments/stepping.py) share.

Why a child process rather than a thread or a signal: a thread cannot be stopped, so a spinning call would keep a CPU
busy in the caller for ever; `signal.alarm` only works in a process's main thread and cannot interrupt a long
computation in native code (a sympy simplification, a huge integer power); killing a process always works. The fork
costs a few milliseconds per batch of calls (and one more per hang or crash), and the child starts with whatever the
caller had loaded.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ray import cloudpickle

from pear_ray.messages import first_line

MESSAGE_CHARS = 500  # an error message is cut to this


@dataclass(frozen=True)
class Outcome:
    """One call's result: "ok" with its value, "error" (it raised, or its process died) with a message, or "timeout"
    (still running at the deadline; its process was killed)."""

    status: Literal["ok", "error", "timeout"]
    value: Any = None
    message: str = ""


def _child(function: Callable[[Any], Any], items: Sequence[Any], conn) -> None:
    """Call `function` on each item in order, sending (True, value) or (False, error message) for each. Sent with
    cloudpickle, as Ray sends, so a value whose class came to this process by value (a test's, a plug-in file's)
    goes back the same way."""
    for item in items:
        try:
            result = cloudpickle.dumps((True, function(item)))
        except BaseException as error:  # noqa: BLE001 - any failure of user code (or of pickling its value) counts
            result = cloudpickle.dumps((False, f"{type(error).__name__}: {first_line(error)}"[:MESSAGE_CHARS]))
        conn.send_bytes(result)
    conn.close()


def call_in_child(function: Callable[[Any], Any], items: Sequence[Any], timeout_s: float) -> list[Outcome]:
    """`function(item)` for every item, in order, in a forked child, waiting at most `timeout_s` for each result. A
    call past its deadline gets its child killed, and a fresh child takes the items after it; so does a call whose
    child died (an error). What comes back crosses a pipe, so it must pickle. No Ray here."""
    context = multiprocessing.get_context("fork")
    outcomes: list[Outcome] = []
    while len(outcomes) < len(items):
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(target=_child, args=(function, items[len(outcomes):], sender), daemon=True)
        child.start()
        sender.close()
        try:
            while len(outcomes) < len(items):
                if not receiver.poll(timeout_s):
                    outcomes.append(Outcome("timeout"))
                    break  # kill this child; a fresh one takes the next item
                try:
                    ok, value = cloudpickle.loads(receiver.recv_bytes())
                except EOFError:
                    child.join()
                    outcomes.append(Outcome("error", message=f"process died (exit code {child.exitcode})"))
                    break
                outcomes.append(Outcome("ok", value) if ok else Outcome("error", message=value))
        finally:
            if child.is_alive():
                child.kill()
            child.join()
            receiver.close()
    return outcomes
