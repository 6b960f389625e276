"""How big an elastic pool should be, from what its phase waited on: the rule alone, pure (no Ray), so that it is
tested without a cluster. actors/elastic.py applies it: it asks the autoscaler for room, starts and releases actors.

Each step gives two shares of its wall time: how long the pool's consumer waited on the pool (RL: the learner,
`wait_seconds / step_seconds`; score and eval: the driver taking the pool's results), and how busy the pool's actors
were (`rollout_busy`: their working seconds / (actors x step seconds)). A step *waited* on the pool when the wait
share reached `grow_at`; it found the pool *idle* when the actors would have been busy at most `shrink_at` of it with
one actor fewer (busy x actors / (actors - 1)). Over the last `window` steps:

    idle in every one        release one actor, down to the pool's minimum
    waited in most of them   ask for one more actor's room, up to its maximum, unless the last one asked for is not
                             up yet
    otherwise                keep what is asked for

Both need the whole window, and the caller starts a new window after every change (of what is asked for, or of the
pool's size), so one noisy step moves nothing and a change is judged by the steps that follow it.
"""

from __future__ import annotations

from collections.abc import Sequence

from pear_ray.config import PoolScaling


def scale_target(waits: Sequence[float], busy: Sequence[float], *, size: int, requested: int, low: int, high: int,
                 rule: PoolScaling) -> int:
    """The actors to ask room for next, given the last steps' wait shares (`waits`) and the pool's busy shares
    (`busy`), oldest first; `size`: the actors taking work now; `requested`: the actors room is asked for now;
    `low`/`high`: the pool's minimum and maximum (num_actors, max_actors)."""
    if len(waits) != len(busy):
        raise ValueError(f"{len(waits)} wait shares but {len(busy)} busy shares: one of each per step")
    requested = min(max(requested, low), high)
    if len(waits) < rule.window:
        return requested
    waits, busy = waits[-rule.window:], busy[-rule.window:]
    if size > low and all(share * size / (size - 1) <= rule.shrink_at for share in busy):
        return max(low, min(requested, size) - 1)
    waited = sum(share >= rule.grow_at for share in waits)
    if 2 * waited > rule.window and requested < high and size >= requested:
        return requested + 1
    return requested
