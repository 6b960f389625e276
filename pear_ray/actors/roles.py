"""Starting the roles a job asks for, and keeping the rollout service's weights in step with the learner's."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from pear_ray.actors.learner import LearnerGroup
from pear_ray.actors.pool import ActorPool, Broadcast, PoolStats
from pear_ray.actors.reference import ReferenceWorker
from pear_ray.actors.rollout import RolloutWorker
from pear_ray.config import ActorResources, RolloutResources
from pear_ray.data import schema
from pear_ray.runtime import actor_options

log = logging.getLogger(__name__)
PROBE_COLUMN = "probe_logprobs"


def rollout_pool(model_dir: str | Path, resources: RolloutResources, *, seed: int) -> ActorPool:
    """N rollout/scoring actors, each placed by the role's resources (N independent of the learner); with max_actors,
    an elastic pool that actors/elastic.py sizes."""
    worker = ray.remote(RolloutWorker).options(**actor_options(resources))

    def make_actor(slot: int):
        return worker.remote(str(model_dir), seed=seed + slot, engine=resources.engine)

    elastic = resources.max_actors is not None
    return ActorPool.start(make_actor, resources.num_actors, max_in_flight=resources.max_in_flight,
                     min_size=resources.num_actors if elastic else None, call_timeout_s=resources.call_timeout_s)


def reference_actor(model_dir: str | Path, resources: ActorResources):
    return ray.remote(ReferenceWorker).options(**actor_options(resources)).remote(str(model_dir))


def reference_pool(model_dir: str | Path, resources: ActorResources) -> ActorPool:
    """One reference actor in a pool of its own, so that should it die a new one starts and scores the batch again."""
    return ActorPool.start(lambda slot: reference_actor(model_dir, resources), size=1, role="reference")


@ray.remote(num_cpus=0.1)
def _with_column(table, values, column: str):
    """The batch with one more log-prob column (a task beside the learner, so the driver fetches neither)."""
    return schema.append_column(table, column, values, schema.LOGPROBS_TYPE)


class LearnerReference:
    """RL's KL reference scored by the learner's ranks on their frozen base, LoRA's adapters off, when it is the
    start model: no reference actor, no second copy of the model. It has a reference pool's interface (`map`,
    `stats`, `shutdown`), so the RL loop scores through either alike."""

    def __init__(self, learner: LearnerGroup):
        self.learner, self.stats = learner, PoolStats()

    def map(self, method: str, items: list[ray.ObjectRef], *, column: str, temperature: float
            ) -> Iterator[tuple[int, ray.ObjectRef, dict]]:
        """`(index, batch with column, stats)` per batch ref, like ActorPool.map("score", ...); the learner scores
        at its own temperature, the rollouts', which must be `temperature`."""
        if method != "score" or temperature != self.learner.temperature:
            raise ValueError(f"the learner's base scores at its temperature {self.learner.temperature}, "
                             f"not {method!r} at {temperature}")
        for index, batch_ref in enumerate(items):
            started = time.perf_counter()
            out = _with_column.remote(batch_ref, self.learner.reference_logprobs(batch_ref), column)
            ray.wait([out], fetch_local=False)
            yield index, out, {"seconds": time.perf_counter() - started}

    def shutdown(self) -> None:
        """Nothing: the learner's ranks are the training loop's to stop."""


def mismatch(learner: LearnerGroup, pool: ActorPool, probe_ref: ray.ObjectRef) -> dict[str, float]:
    """Max and mean |rollout log-prob - learner log-prob| over a probe batch's policy tokens, across every rollout
    actor.

    Both sides at the learner's temperature (the rollouts'), as the importance ratios are. Near zero in fp32 right
    after a sync; anything else means the engines disagree (dtype, kernels, or a sync that did not land) and the RL
    importance ratios are off by that much.
    """
    return _mismatch(pool, *_score_probe(learner, pool, probe_ref))


def _score_probe(learner: LearnerGroup, pool: ActorPool, probe_ref: ray.ObjectRef):
    """Queue the probe's scoring on the learner and on every rollout actor (a few rows each)."""
    return learner.logprobs(probe_ref), pool.broadcast("score", probe_ref, column=PROBE_COLUMN,
                                                       temperature=learner.temperature)


def _mismatch(pool: ActorPool, learner_ref: ray.ObjectRef, scores) -> dict[str, float]:
    scored = [table for table, _ in pool.gather(scores)]
    learner_logp = np.concatenate(ray.get(learner_ref).to_pylist())
    # the policy's tokens only: importance ratios are taken there, and the learner gives 0.0 at the environment's
    policy = schema.policy_tokens(scored[0])
    every = np.concatenate([np.abs(np.concatenate(table.column(PROBE_COLUMN).to_pylist()) - learner_logp)[policy]
                            for table in scored])
    return {"mismatch_max": float(every.max()), "mismatch_mean": float(every.mean())}


@dataclass
class Sync:
    """A weight update queued on every rollout actor (and the mismatch probe behind it), not yet waited for."""

    pool: ActorPool
    update: Broadcast
    probe: tuple | None
    version: int
    colocated: bool
    seconds: float  # the driver's time sending it
    nbytes: int  # sent to each actor: the full weights, the adapters under LoRA, nothing colocated

    def finish(self) -> dict[str, float]:
        """Wait until every actor holds the weights; the driver's seconds on this sync, the version, the mismatch."""
        waiting = time.perf_counter()
        self.pool.gather(self.update)
        metrics = {"policy_version": self.version}
        if self.probe is not None:
            metrics.update(_mismatch(self.pool, *self.probe))
        metrics["sync_seconds"] = self.seconds + time.perf_counter() - waiting
        metrics["sync_bytes"] = self.nbytes
        log.info("weights v%d synced to %d %s in %.2f s (%s B each)%s", self.version, len(self.pool.actors),
                 "learner rank(s), in place" if self.colocated else "rollout actor(s)", metrics["sync_seconds"],
                 f"{self.nbytes:,}", f"; mismatch max {metrics['mismatch_max']:.2e}" if self.probe is not None else "")
        return metrics


def start_sync(learner: LearnerGroup, pool: ActorPool, version: int, probe_ref: ray.ObjectRef | None = None,
               then: Callable[[], None] | None = None, colocated: bool = False) -> Sync:
    """Hand the learner's current policy to every rollout actor (actor to actor, by ObjectRef: its weights, or under
    LoRA its adapters alone), and queue the mismatch probe behind them if one is given; `Sync.finish` waits for both.
    `then` runs once the update (and the probe) is queued on every actor: what it queues (the next rollouts) runs on
    the new weights, with no idle gap.
    `colocated`: the pool is the learner's own ranks (LearnerGroup.rollout_pool), whose engines take their rank's
    weights in place, so nothing is sent."""
    started = time.perf_counter()
    method, policy = ("update_weights", None) if colocated else learner.policy_update()
    update = pool.broadcast(method, policy, version)
    probe = _score_probe(learner, pool, probe_ref) if probe_ref is not None else None
    if then is not None:
        then()
    return Sync(pool, update, probe, version, colocated, time.perf_counter() - started,
                0 if colocated else learner.policy_nbytes)


def sync_weights(learner: LearnerGroup, pool: ActorPool, version: int, **kwargs) -> dict[str, float]:
    """`start_sync`, waited for."""
    return start_sync(learner, pool, version, **kwargs).finish()


def probe_batch(table, rows: int = 8) -> ray.ObjectRef:
    """A small fixed (prompt, response) batch for the mismatch metric, in the object store."""
    return ray.put(probe_rows(table, rows))


def probe_rows(table, rows: int = 8):
    """The probe batch's rows: the first `rows` (prompt, response) pairs of a batch, with the policy's tokens marked
    when the batch marks them."""
    keep = [c for c in (schema.ID, schema.PROMPT_IDS, schema.RESPONSE_IDS, schema.POLICY_MASK)
            if c in table.column_names]
    return table.select(keep).slice(0, rows)
