"""The learner on Ray: M DeepSpeed ranks as M actors in one placement group, driven as one object.

`LearnerGroup` places M bundles ({"CPU": num_cpus, "GPU": num_gpus, **resources} each, strategy PACK), starts one
`LearnerRank` actor per bundle, asks rank 0 for its node IP and a free port (the rendezvous), then builds a
`DeepSpeedLearner` in every actor at once (they meet in init_distributed). Every call fans out to all ranks, which
is required: each engine method is collective.

Batches. The driver passes an ObjectRef of a whole Arrow batch; Ray hands the same object to every rank (zero-copy
from the node's object store; on a cluster each learner node fetches it once), and each rank trains on its
contiguous shard. Split: with n rows over W ranks, rank r gets rows [r*q + min(r, m), (r+1)*q + min(r+1, m)) where
q, m = divmod(n, W): the first m ranks take one row more (numpy's array_split). A step needs n >= W x the objective's
minibatches; `logprobs` accepts any n. The objective travels with every step as itself (a typed config), and the
ranks sum the loss's divisor among themselves, so no metadata travels with the ref. SFT streams instead (`stream`,
then `step(STREAMED, ...)`): each rank reads its shard of every step, by the same split, straight from the Parquet
file through Ray Data (actors/data_stream.py).

Bulk results stay in the object store: `logprobs` returns an ObjectRef of the concatenated column and `weights_ref`
the ObjectRef of rank 0's full state dict, for the driver to hand to other actors without fetching them.

Nodes that go. The group knows each rank's node (its placement group's); `notice()`, asked after every step, says
whether one of them is draining (actors/draining.py), and the training loop then checkpoints and raises
`LearnerPreempted`, so that its stage starts again from there with a new group, which Ray places elsewhere. A rank
lost without notice is `LearnerLost`: the stage starts again from its last checkpoint (resources.learner.max_restarts).
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.exceptions import RayActorError
from ray.util import placement_group_table
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pear_ray.actors.data_stream import stream_rows
from pear_ray.actors.draining import DrainWatch, LearnerNotice, learner_notice
from pear_ray.actors.pool import ActorPool, Member, Members
from pear_ray.config import EngineOptions, LearnerResources, LoraConfig, TransformersOptions
from pear_ray.messages import first_line
from pear_ray.objectives import ObjectiveConfig
from pear_ray.runtime import use_assigned_cpus
from pear_ray.storage import materialize

log = logging.getLogger(__name__)


def shard_bounds(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous shard: the first num_rows % world_size ranks get one row more."""
    q, m = divmod(num_rows, world_size)
    return rank * q + min(rank, m), (rank + 1) * q + min(rank + 1, m)


class LearnerWorker:
    """One rank: holds a DeepSpeedLearner, cuts its shard out of each batch and delegates to the engine."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.engine = None
        use_assigned_cpus()

    def rendezvous(self) -> tuple[str, int]:
        """This node's IP and a port free on it now, for MASTER_ADDR / MASTER_PORT (asked of rank 0)."""
        ip = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((ip, 0))
            return ip, sock.getsockname()[1]

    def start(self, model_dir: str, master_addr: str, master_port: int, **engine_kwargs: Any) -> None:
        from pear_ray.engines.deepspeed_learner import DeepSpeedLearner  # heavy: import in the actor only

        self.engine = DeepSpeedLearner(materialize(model_dir), rank=self.rank, world_size=self.world_size,
                                       master_addr=master_addr, master_port=master_port, **engine_kwargs)

    def _check_splittable(self, num_rows: int, what: str, min_rows_per_rank: int) -> None:
        if num_rows < self.world_size * min_rows_per_rank:
            need = f"{self.world_size} ranks" + (f" x {min_rows_per_rank} minibatches" if min_rows_per_rank > 1
                                                 else "")
            raise ValueError(f"{what}: a batch of {num_rows} rows cannot be split over {need}; every rank "
                             f"needs at least {min_rows_per_rank} row(s), so give at least "
                             f"{self.world_size * min_rows_per_rank} rows")

    def _shard(self, batch: pa.Table | pa.RecordBatch, what: str, min_rows_per_rank: int = 1) -> pa.Table:
        table = pa.table(batch) if isinstance(batch, pa.RecordBatch) else batch
        self._check_splittable(table.num_rows, what, min_rows_per_rank)
        start, end = shard_bounds(table.num_rows, self.world_size, self.rank)
        return table.slice(start, end - start)

    def step(self, batch: pa.Table, objective: ObjectiveConfig) -> dict:
        return self.engine.step(self._shard(batch, f"a {objective.kind} step", objective.updates()[0]), objective)

    def open_stream(self, path: str, batches: list[np.ndarray]) -> None:
        """Stream this rank's shard of each batch (row indices into the Parquet file at `path`, one array per step
        to come, in step order) through Ray Data, for `streamed_step`."""
        self.stream_sizes = iter([len(batch) for batch in batches])
        self.stream = stream_rows(path, [batch[slice(*shard_bounds(len(batch), self.world_size, self.rank))]
                                         for batch in batches])

    def streamed_step(self, objective: ObjectiveConfig) -> dict:
        """`step` on this rank's shard of the next streamed batch."""
        self._check_splittable(next(self.stream_sizes), f"a {objective.kind} step", objective.updates()[0])
        return self.engine.step(next(self.stream), objective)

    def logprobs(self, batch: pa.Table, method: str = "logprobs") -> pa.ListArray:
        """The engine's `method` (logprobs, reference_logprobs) on this rank's shard, which may have no rows."""
        return getattr(self.engine, method)(self._shard(batch, method, min_rows_per_rank=0))

    def concat(self, *arrays: pa.Array) -> pa.Array:
        return pa.concat_arrays(list(arrays))

    def call(self, name: str, *args: Any) -> Any:
        """Any other engine method (weights, checkpoints) called on this rank, or an attribute's value."""
        value = getattr(self.engine, name)
        return value(*args) if callable(value) else value

    # ------------------------------------------------------------------ colocated generation

    def start_rollout(self, options: EngineOptions, seed: int) -> None:
        """Colocated RL: a rollout engine in this rank's process (the rollout actor's interface below). The
        transformers backend serves the very module this rank trains, so it always generates with the current
        weights; vLLM keeps a copy of its own, reloaded in place from the module by `update_weights`."""
        from pear_ray.actors.rollout import RolloutWorker

        self.rollout = RolloutWorker(self.engine.model_dir, seed=seed, engine=options,
                                     model=self.engine.engine.module)
        self.shares_weights = isinstance(options, TransformersOptions)

    @ray.method(num_returns=2)
    def generate(self, prompts: pa.Table, **kwargs: Any):
        return self.rollout.generate(prompts, **kwargs)

    @ray.method(num_returns=2)
    def episodes(self, prompts: pa.Table, **kwargs: Any):
        return self.rollout.episodes(prompts, **kwargs)

    @ray.method(num_returns=2)
    def score(self, table: pa.Table, **kwargs: Any):
        return self.rollout.score(table, **kwargs)

    def update_weights(self, weights: None, version: int) -> int:
        """The rollout engine takes this rank's own current weights as `version` (in place, no copy between
        processes); `weights` is None, as there is nothing to send."""
        if self.shares_weights:
            return self.rollout.set_policy_version(version)
        return self.rollout.update_weights(self.engine.full_weights(), version)

    def set_policy_version(self, version: int) -> int:
        return self.rollout.set_policy_version(version)


LearnerRank = ray.remote(LearnerWorker)


STREAMED = "streamed"  # a step's batch that is the next one every rank streams (LearnerGroup.stream)


def _as_ref(batch: ray.ObjectRef | pa.Table | pa.RecordBatch) -> ray.ObjectRef:
    """The driver should pass refs; a table is put once here (a convenience for tests and small scripts)."""
    return batch if isinstance(batch, ray.ObjectRef) else ray.put(batch)


class LearnerPreempted(RuntimeError):
    """A node of the learner's ranks is draining (a preemption notice): the training loop stopped at a step boundary,
    after a checkpoint when the deadline left time for one, so that its stage starts again on other nodes from its last
    checkpoint. A planned restart: it does not count against resources.learner.max_restarts."""

    def __init__(self, notice: LearnerNotice, step: int):
        self.notice, self.step = notice, step
        self.what = (f"{notice}; stopped after step {step}, "
                     + ("checkpointed there" if notice.checkpoint else "too close to its deadline to checkpoint"))
        super().__init__(self.what)


class LearnerLost(RuntimeError):
    """A learner rank is gone (killed, out of memory, its node lost): this group cannot go on, its stage can only
    stop or start again from its last checkpoint (resources.learner.max_restarts)."""

    def __init__(self, rank: int, world_size: int, cause: RayActorError):
        self.what = (f"learner rank {rank} of {world_size} is gone "
                     f"({first_line(cause)})")
        super().__init__(f"{self.what}; the stage stopped at its last checkpoint: run the same command again to "
                         "resume it, or set resources.learner.max_restarts to let it restart by itself")


def _get_all(refs: list[ray.ObjectRef], first_rank: int = 0) -> list:
    """ray.get of one call per rank (ranks first_rank...) that raises the first rank failure as soon as it happens
    (the others may then wait forever in a collective: call LearnerGroup.shutdown); a rank that died is a
    LearnerLost."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(done)
        except Exception as error:
            # Collect the other ranks' results that are already there (often the same error), so Ray does not
            # log them as unhandled; ranks stuck in a collective are left for shutdown().
            finished, _ = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            for ref in finished:
                try:
                    ray.get(ref)
                except Exception:
                    pass
            if isinstance(error, RayActorError):
                raise LearnerLost(first_rank + refs.index(done[0]), first_rank + len(refs), error) from None
            raise
    return ray.get(refs)


class RanksAsMembers(Members):
    """The learner's ranks as the members of a pool (colocated generation). The pool did not start them and must not
    replace one: a lost rank is LearnerLost, and the stage restarts from its checkpoint (resources.learner)."""

    def __init__(self, actors: list):
        super().__init__(call_timeout_s=None, role="learner rank")
        self.slots.update((rank, Member(rank, actor, actor.__ray_ready__.remote())) for rank, actor in enumerate(actors))

    def lose(self, member: Member, error: Exception) -> Member | None:
        raise LearnerLost(member.slot, len(self.slots), error)

    def heed_drains(self) -> None:
        """Nothing: the training loop moves the whole group when a node of its ranks drains (LearnerGroup.notice)."""

    def shutdown(self) -> None:
        self.slots.clear()  # the ranks are the learner group's to stop


class LearnerGroup:
    """M learner ranks in one placement group, used like one learner.

    Optimizer settings are the group's (one AdamW and one LR schedule per group: every training builds its own, see
    stages/loop.py); the objective comes with every step. `temperature` is the rollouts' sampling temperature, at
    which on-policy objectives and `logprobs` see the policy (DeepSpeedLearner).
    """

    def __init__(self, model_dir: str | Path, resources: LearnerResources | None = None, *,
                 lora: LoraConfig | None = None, ready_timeout_s: float = 600.0, **optimizer: Any):
        """`optimizer`: DeepSpeedLearner's settings (lr, weight_decay, grad_clip, warmup_steps, total_steps,
        lr_schedule, seed, temperature); `lora`: train adapters on the frozen model; the resources give the rest."""
        self.resources = resources or LearnerResources()
        self.world_size = self.resources.num_ranks
        self.lora = lora
        self.actors: list = []
        self.drains = DrainWatch()
        self.checkpoint_seconds: float | None = None  # how long the last checkpoint took
        bundle = {"CPU": self.resources.num_cpus, "GPU": self.resources.num_gpus, **self.resources.resources}
        bundle = {key: value for key, value in bundle.items() if value > 0}
        self.placement_group = placement_group([dict(bundle) for _ in range(self.world_size)], strategy="PACK")
        try:
            ready, _ = ray.wait([self.placement_group.ready()], timeout=ready_timeout_s)
            if not ready:
                raise TimeoutError(f"the learner's {self.world_size} bundles of {bundle} were not placed within "
                                   f"{ready_timeout_s:.0f} s: the cluster lacks those resources")
            # Ray places nothing on a draining node, so a group started after a notice is elsewhere.
            placed = placement_group_table(self.placement_group)["bundles_to_node_id"]
            self.rank_nodes = [placed[rank] for rank in range(self.world_size)]
            self.actors = [
                LearnerRank.options(
                    num_cpus=self.resources.num_cpus,
                    num_gpus=self.resources.num_gpus,
                    resources=dict(self.resources.resources),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=self.placement_group, placement_group_bundle_index=rank),
                ).remote(rank, self.world_size)
                for rank in range(self.world_size)
            ]
            master_addr, master_port = ray.get(self.actors[0].rendezvous.remote())
            engine_kwargs = dict(
                zero_stage=self.resources.zero_stage, bf16=self.resources.bf16,
                max_tokens_per_micro_batch=self.resources.max_tokens_per_micro_batch,
                local_rank=0,  # a GPU rank sees only its own GPU (Ray sets CUDA_VISIBLE_DEVICES per actor)
                lora=lora, **optimizer,
            )
            _get_all([actor.start.remote(str(model_dir), master_addr, master_port, **engine_kwargs)
                      for actor in self.actors])
            self.temperature = ray.get(self.actors[0].call.remote("temperature"))
        except BaseException:
            self.shutdown()
            raise
        log.info("learner group up: %d rank(s), ZeRO-%d, rendezvous %s:%d, on node(s) %s", self.world_size,
                 self.resources.zero_stage, master_addr, master_port, ", ".join(dict.fromkeys(self.rank_nodes)))

    def _live_actors(self) -> list:
        if not self.actors:
            raise RuntimeError("the learner group is shut down")
        return self.actors

    def _all(self, method: str, *args: Any, **kwargs: Any) -> list:
        return _get_all([getattr(actor, method).remote(*args, **kwargs) for actor in self._live_actors()])

    # ------------------------------------------------------------------ training

    def step(self, batch: ray.ObjectRef | str, objective: ObjectiveConfig) -> dict:
        """One step of `objective` on the whole batch (its minibatches x epochs updates), or with STREAMED on the
        next batch `stream` opened; returns the global-batch loss, grad norm, lr and the objective's figures."""
        if isinstance(batch, str) and batch == STREAMED:
            return self._all("streamed_step", objective)[0]
        return self._all("step", _as_ref(batch), objective)[0]

    def stream(self, path: str | Path, batches: list[np.ndarray]) -> None:
        """Have every rank stream its shard of each batch (row indices into the Parquet file at `path`, one array
        per step to come, in step order) through Ray Data, for `step(STREAMED, ...)`: the rows go from the file to the
        ranks, not through the driver nor through one object holding the file."""
        self._all("open_stream", str(path), ray.put(batches))

    def logprobs(self, batch_ref: ray.ObjectRef, method: str = "logprobs") -> ray.ObjectRef:
        """ObjectRef of the batch's per-response-token log-probs (list<float32>, one per row, in row order), at
        the group's temperature; `method="reference_logprobs"`: under LoRA, the frozen base's (adapters off).

        Each rank scores its shard; rank 0 concatenates the pieces, so nothing passes through the driver.
        """
        batch_ref = _as_ref(batch_ref)
        actors = self._live_actors()
        parts = [actor.logprobs.remote(batch_ref, method) for actor in actors]
        merged = actors[0].concat.remote(*parts)
        ray.wait([merged], fetch_local=False)
        return merged

    def reference_logprobs(self, batch_ref: ray.ObjectRef) -> ray.ObjectRef:
        """`logprobs` under the frozen base, LoRA's adapters off: RL's KL reference when it is the start model."""
        return self.logprobs(batch_ref, "reference_logprobs")

    # ------------------------------------------------------------------ weights, checkpoints

    def weights_ref(self) -> ray.ObjectRef:
        """ObjectRef of the full weights {HF name: CPU tensor} from rank 0 (under LoRA, merged), for rollout actors'
        update_weights. Returns once they are ready; the driver need not fetch them."""
        return self._rank_0_ref("state_dict_for_rollout")

    def policy_update(self) -> tuple[str, ray.ObjectRef]:
        """What a rollout actor takes to serve the current policy, and its method: under LoRA the adapters alone
        (`update_adapter`, engines/adapters.py), else the full weights (`update_weights`)."""
        if self.lora is None:
            return "update_weights", self.weights_ref()
        return "update_adapter", self._rank_0_ref("adapter_for_rollout")

    @functools.cached_property
    def policy_nbytes(self) -> int:
        """Bytes one sync sends to each rollout actor (the adapters' under LoRA)."""
        return ray.get(self._live_actors()[0].call.remote("policy_nbytes"))

    def _rank_0_ref(self, method: str) -> ray.ObjectRef:
        refs = [actor.call.remote(method) for actor in self._live_actors()]
        _get_all(refs[1:], first_rank=1)  # None from ranks > 0; raises if one failed
        ray.wait(refs[:1], fetch_local=False)
        return refs[0]

    def export_hf(self, out_dir: str | Path) -> str:
        """Write a Hugging Face model folder (weights, config, tokenizer) and return its path."""
        return self._all("call", "export_hf", str(out_dir))[0]

    def save_checkpoint(self, ckpt_dir: str | Path, client_state: dict | None = None, tag: str | None = None) -> str:
        """Checkpoint all ranks (model, optimizer, scheduler, step, RNG) plus client_state; returns the tag."""
        started = time.perf_counter()
        tag = self._all("call", "save_checkpoint", str(ckpt_dir), client_state, tag)[0]
        self.checkpoint_seconds = time.perf_counter() - started
        return tag

    def notice(self) -> LearnerNotice | None:
        """Whether a node of the ranks is draining, so that the group must move, and whether there is time to
        checkpoint first (by the last checkpoint's duration); None: stay. Cheap enough for every step."""
        return learner_notice(self.drains(), self.rank_nodes, time.time(), self.checkpoint_seconds)

    def load_checkpoint(self, ckpt_dir: str | Path, tag: str | None = None) -> dict:
        """Restore the latest (or the tagged) checkpoint on all ranks; returns the saved client_state."""
        return self._all("call", "load_checkpoint", str(ckpt_dir), tag)[0]

    def parameter_checksums(self) -> list[float]:
        """Each rank's fingerprint of the full parameters (equal across ranks when they agree)."""
        return self._all("call", "parameter_checksum")

    @property
    def optimizer_steps(self) -> int:
        """Optimizer updates applied so far."""
        return ray.get(self._live_actors()[0].call.remote("optimizer_steps"))

    # ------------------------------------------------------------------ colocated generation

    def rollout_pool(self, options: EngineOptions, *, seed: int, max_in_flight: int = 2) -> ActorPool:
        """Colocated RL: the ranks as a rollout pool, each with a rollout engine in its process (`start_rollout`)
        that generates with the weights the rank trains. `update_weights(None, version)` on the pool hands each
        engine its rank's current weights in place."""
        _get_all([actor.start_rollout.remote(options, seed + rank) for rank, actor in enumerate(self._live_actors())])
        return ActorPool(RanksAsMembers(self.actors), max_in_flight=max_in_flight)

    def shutdown(self) -> None:
        """Kill the ranks and free the placement group. Safe to call twice."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if getattr(self, "placement_group", None) is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None
