"""Stage 3: RL from an SFT checkpoint: GRPO, on-policy distillation, or a plug-in objective.

Each step: G samples for each of `prompts_per_step` train prompts from the rollout service, verifier rewards
in Ray tasks, group-normalised advantages, groups whose rewards are all equal dropped (when the objective reads
the advantage; with `fill_batch`, more prompts drawn until the step has enough groups that differ), the frozen
models' log-probs the objective reads (the reference's for a KL term, the teacher's for on-policy distillation),
the objective's updates on the learner, then the new weights go to the rollout service.

With `max_staleness: k` the rollout service generates the batches of the next k steps while the learner trains:
step t's batch is generated with the weights of version max(t - k, its checkpoint interval's first step), i.e.
queued on the actors right after that version's sync, which reaches them between two requests. Versions count RL
steps (weights after t steps are version t); every sample records its own, and a sample older than k versions (an
actor replaced with start weights) is counted and regenerated.

Resumable from the checkpoint of every `checkpoint_every` steps: a step's prompts and sampling seed depend only on
(seed, step), and its policy version only on (step, k, checkpoint_every), so a resumed run sees what an
uninterrupted one would.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pear_ray.actors.elastic import PoolScaler
from pear_ray.actors.learner import LearnerGroup
from pear_ray.actors.roles import LearnerReference, reference_pool, rollout_pool, start_sync, sync_weights
from pear_ray.config import ConfigError, serving_adapters
from pear_ray.data import schema
from pear_ray.rewards import model_reward_columns
from pear_ray.runtime import free_cpus_short_of
from pear_ray.stages.common import (
    ENVIRONMENT_FAILURES,
    Run,
    prompt_table,
    rollout_pieces,
    sampling_call,
    start_reward_models,
    style_shares,
)
from pear_ray.stages.loop import Training, train
from pear_ray.stages.rl_batch import (
    busy_fractions,
    cut_batch,
    extra_prompts,
    generation_horizon,
    save_rollouts,
    score_samples,
    step_prompts,
)
from pear_ray.tasks.verify import DEFAULT_NUM_CPUS as VERIFIER_CPUS

log = logging.getLogger(__name__)


def run_rl(run: Run, variant: str, start_model: Path) -> Path:
    """GRPO (or rl.objective) from `start_model` (the variant's SFT export); returns the exported folder."""
    job, rl = run.job, run.job.rl
    training = Training(name=f"rl-{variant}", stage="rl", variant=variant, model=start_model,
                        export=run.model(f"rl-{variant}"), objective=job.rl_objective(variant), optimizer=rl.optimizer,
                        steps=rl.steps, checkpoint_every=rl.checkpoint_every, seed=job.seed,
                        temperature=job.sampling.temperature, lora=job.models.student.lora)
    return train(run, training, RolloutBatches(run, training))


@dataclass
class Submitted:
    """One step's generation, queued: the pool's mapping, its pieces' refs, the scoring queued behind them."""

    mapping: Iterator
    refs: list[ray.ObjectRef]  # the pieces' batches, in prompt order
    scored: tuple[ray.ObjectRef, ray.ObjectRef]  # the scoring task queued on them: (table, figures)
    cut: tuple | None = None  # the step's cut queued behind the scoring, when nothing is added to it (no fill)


@dataclass
class Generated:
    """A step's samples once generated (regenerated if too stale): the scoring's refs, each piece's generation
    figures, whether they are the pieces first queued, and how many samples were too stale."""

    submitted: Submitted
    scored: tuple[ray.ObjectRef, ray.ObjectRef]
    pieces: list[dict]
    unchanged: bool
    stale: int
    wait_seconds: float


def room_for_step_tasks(cpus: float) -> None:
    """Each step's scoring, cut and verifier tasks need `cpus` CPUs beside the learner and the pools, or they wait for
    ever: refused on an embedded Ray instance (it never grows), a warning on a cluster (a node may join)."""
    if (short := free_cpus_short_of(cpus)) is None:
        return
    free, never_more = short
    what = (f"RL's per-step tasks (scoring, verifiers) need {cpus:g} CPU free beside the learner and the rollout and "
            f"reference actors; {free:g} is left")
    if never_more:
        raise ConfigError(f"{what} on this machine: lower resources.learner.num_cpus (x num_ranks), "
                          "resources.rollout.num_cpus (x num_actors) or resources.reference.num_cpus")
    log.warning("%s: they wait until a node with CPUs joins the cluster", what)


class RolloutBatches:
    """RL's batch source for the training loop (stages/loop.py).

    A step's batch: the rollout pool's samples (generated ahead up to `max_staleness` steps, `submit_until`),
    regenerated if an actor replaced meanwhile made them too stale; scored (decode, verify, advantages) and cut to the
    groups that carry a signal in Ray tasks next to them, topped up with more prompts under fill_batch; then the
    frozen models' log-probs the objective reads. After each update the new weights go to the rollout service, and
    the next steps' generation is queued behind them. An elastic pool (max_actors) is sized by a PoolScaler
    (actors/elastic.py): at the start of a step the actors that came up get the weights and take work; after it, the
    learner's wait share (wait_seconds / step_seconds) and the actors' busy share go to the scaler, which may ask for
    room for one more or release one.
    """

    def __init__(self, run: Run, training: Training):
        self.run, self.rl, self.training = run, run.job.rl, training
        self.pool, self.scaler, self.scorers, self.probe, self.pending = None, None, {}, None, None
        self.reward_models = None

    # ------------------------------------------------------------------ the loop's interface

    def start(self, learner: LearnerGroup, step: int) -> None:
        """The frozen scorers and the rollout pool, on the start model's weights (the learner's, once resumed)."""
        run, job, objective = self.run, self.run.job, self.training.objective
        self.learner = learner
        frozen_models = {schema.REF_LOGPROBS: lambda: run.reference(self.training.model),
                         schema.TEACHER_LOGPROBS: run.teacher}
        columns = objective.columns()
        self.scorers = {}
        if schema.REF_LOGPROBS in columns:
            if self.training.lora is not None and job.models.reference is None:  # the reference is LoRA's base
                log.info("KL reference: the learner's base model, adapters off (no reference actor)")
                self.scorers[schema.REF_LOGPROBS] = LearnerReference(learner)
            else:
                log.info("KL reference: a reference actor on %s",
                         "models.reference" if job.models.reference else self.training.model)
        self.scorers.update({column: reference_pool(run.shared(model()), job.resources.reference)
                             for column, model in frozen_models.items() if column in columns
                             and column not in self.scorers})
        rollout = job.resources.rollout
        self.colocated = rollout.colocate
        if self.colocated:  # the learner's ranks generate, with the weights they train
            self.pool = learner.rollout_pool(rollout.engine, seed=job.seed, max_in_flight=rollout.max_in_flight)
        else:
            if self.training.lora is not None:  # each sync sends the adapters: the engines serve base + adapter
                rollout = rollout.model_copy(update={"engine": serving_adapters(rollout.engine, self.training.lora.r)})
            self.pool = rollout_pool(run.shared(self.training.model), rollout, seed=job.seed)
        if rollout.max_actors:  # elastic
            self.scaler = PoolScaler(self.pool, rollout, "rl")
        self.reward_models = start_reward_models(run)
        room_for_step_tasks(VERIFIER_CPUS)  # the largest of them
        if step:
            self.sync(step)
        self.prompts = prompt_table(run, "train")
        self.drop_constant = self.rl.drop_constant_groups and schema.ADVANTAGE in objective.columns()  # else no loss
        self.fill = self.rl.fill_batch and self.drop_constant
        self.submitted: dict[int, Submitted] = {}
        self.next_step = step  # the first step not queued yet
        self.task_ref = ray.put(run.task)
        self.student = run.shared(run.student)  # its tokenizer decodes the samples, on any node

    def batch(self, step: int) -> tuple[ray.ObjectRef | None, dict]:
        """Step `step`'s batch with the frozen models' columns, or None when too few samples carry a signal."""
        job = self.run.job
        self.started = time.perf_counter()
        if self.scaler is not None and self.scaler.grow():  # new actors: they hold the start weights
            self.sync(step)
        self.submit_until(generation_horizon(step, self.rl))  # with the weights the actors hold: version step
        batch_ref, self.probe, figures = self.cut(step, self.generated(step))
        if figures["trained_samples"] < job.resources.learner.num_ranks * self.training.objective.updates()[0]:
            log.info("%s step %d: every group's rewards were equal; no update", self.training.name, step + 1)
            self.probe = None
            return None, figures
        scoring = time.perf_counter()
        for column, scorer in self.scorers.items():  # at the rollouts' temperature, as the policy is scored
            [(_, batch_ref, _)] = scorer.map("score", [batch_ref], column=column,
                                             temperature=job.sampling.temperature)
        figures["score_seconds"] = time.perf_counter() - scoring
        return batch_ref, figures

    def after_update(self, step: int, figures: dict) -> dict:
        """The new weights to every rollout actor (the next steps' generation queued behind them), or, without an
        update, the same weights relabelled as the next version; then the step's pool figures.

        Generating ahead (max_staleness >= 1), the driver does not wait for the update to land: an actor loads it
        only once it has finished the batch in flight, and the learner can train on that batch meanwhile. The update
        is waited for at the next step (or before any other sync), so its version and mismatch figures are logged
        with the next step; `sync_seconds` is the driver's time on syncs in this step."""
        pool, started = self.pool, time.perf_counter()
        out = self.landed()
        if self.probe is not None:
            sync = start_sync(self.learner, pool, step + 1, probe_ref=self.probe, colocated=self.colocated,
                              then=lambda: self.submit_until(generation_horizon(step + 1, self.rl)))
            if self.rl.max_staleness and step + 1 < self.rl.steps:
                self.pending = sync
            else:
                out.update(sync.finish())
        else:
            pool.call_all("set_policy_version", step + 1)
        out["sync_seconds"] = time.perf_counter() - started
        out.update(busy_fractions(figures, time.perf_counter() - self.started, len(pool.actors)))
        if self.scaler is not None:
            out.update(self.scaler.observe(figures["wait_seconds"] / out["step_seconds"], out["rollout_busy"]))
        out.update(rollout_actors=len(pool.actors), rollout_actors_lost=pool.stats.actors_dropped
                   + pool.stats.actors_replaced, rollout_batches_rerun=pool.stats.resubmitted,
                   reference_actors_replaced=sum(scorer.stats.actors_replaced for scorer in self.scorers.values()))
        return out

    def sync(self, version: int) -> dict:
        """The learner's current weights to the rollout service as `version`, waited for (after any update still
        landing, whose figures go unlogged)."""
        self.landed()
        return sync_weights(self.learner, self.pool, version, colocated=self.colocated)

    def landed(self) -> dict:
        """The figures of the update after_update did not wait for, once every actor holds it ({} when none)."""
        sync, self.pending = self.pending, None
        return {} if sync is None else sync.finish()

    def close(self) -> None:
        if self.scaler is not None:
            self.scaler.close()
        if self.pool is not None:
            self.pool.shutdown()
        for scorer in self.scorers.values():
            scorer.shutdown()
        if self.reward_models is not None:
            self.reward_models.shutdown()

    # ------------------------------------------------------------------ generation, ahead of the learner

    def submit_until(self, last: int) -> None:
        """Queue the generation of every step's batch up to `last` not queued yet, on the actors' current weights."""
        for step in range(self.next_step, last + 1):
            self.submitted[step] = self._submit_step(step)
        self.next_step = max(self.next_step, last + 1)

    def _submit_step(self, step: int) -> Submitted:
        """A step's generation, its scoring and (without fill) its cut, queued to run without the driver."""
        chosen, seed = step_prompts(self.prompts.num_rows, self.run.job.seed, step, self.rl.prompts_per_step)
        submitted = self._submit(self.prompts.take(chosen), seed)
        if not self.fill:
            submitted.cut = self._cut_task(step, submitted.scored[0])
        return submitted

    def _submit(self, prompts: pa.Table, seed: int) -> Submitted:
        """Queue the prompts' generation, and its scoring behind it: a Ray task that starts when the samples
        are there, without the driver."""
        pieces, _ = rollout_pieces(self.pool, prompts)
        method, arguments = sampling_call(self.run.environment)
        mapping = self.pool.submit(method, pieces, n=self.rl.group_size, seed=seed, **arguments,
                                   **self.run.job.sampling.model_dump())
        return Submitted(iter(mapping), mapping.refs(), self._score_task(mapping.refs()))

    def _score_task(self, pieces: list[ray.ObjectRef]) -> tuple[ray.ObjectRef, ray.ObjectRef]:
        return score_samples.remote(self.student, self.task_ref, self.run.job.task, self.rl.normalize_std,
                                    *pieces, reward_models=self.reward_models)

    def _cut_task(self, step: int, *tables: ray.ObjectRef) -> tuple:
        return cut_batch.remote(step, self.rl.prompts_per_step if self.fill else None, self.drop_constant,
                                self.rl.save_rollouts, *tables)

    def _collect(self, submitted: Submitted) -> tuple[tuple[ray.ObjectRef, ray.ObjectRef], list[dict], bool]:
        """Once generated: refs of the samples scored and of its figures, the pieces' generation stats (rows,
        actor-seconds, policy version), and whether every piece is the one first queued. Pieces re-run on another
        actor (theirs died) are scored again."""
        done = {}
        for index, ref, stats in submitted.mapping:
            done[index] = ref, stats
        pieces, generated = zip(*(done[i] for i in range(len(done))))
        unchanged = list(pieces) == submitted.refs
        return (submitted.scored if unchanged else self._score_task(list(pieces))), list(generated), unchanged

    # ------------------------------------------------------------------ one step's batch

    def generated(self, step: int) -> Generated:
        """Step `step`'s samples, waited for; regenerated on the current weights when some are older than
        max_staleness versions (an actor replaced meanwhile started from the start model's weights)."""
        waiting = time.perf_counter()
        submitted = self.submitted.pop(step)
        scored, pieces, unchanged = self._collect(submitted)
        wait_seconds = time.perf_counter() - waiting
        stale = sum(piece["rows"] for piece in pieces if piece["policy_version"] < step - self.rl.max_staleness)
        if stale:
            log.warning("step %d: %d samples older than %d versions; regenerating", step + 1, stale,
                        self.rl.max_staleness)
            self.sync(step)
            submitted = self._submit_step(step)
            scored, regenerated, unchanged = self._collect(submitted)
            pieces += regenerated
        return Generated(submitted, scored, pieces, unchanged, stale, wait_seconds)

    def cut(self, step: int, generated: Generated) -> tuple[ray.ObjectRef, ray.ObjectRef, dict]:
        """The step's batch: groups with no signal dropped when `drop_constant` (more prompts drawn until enough
        differ, with fill_batch); refs of the batch and of a probe of it, and the step's figures. Saves the step's
        samples with rl.save_rollouts."""
        verifying = time.perf_counter()
        tables, scored, pieces = (generated.scored[0],), (ray.get(generated.scored[1]),), generated.pieces
        if self.fill:
            more = self._fill(step, scored[0]["informative_groups"])
            tables, scored, pieces = tables + more[0], scored + more[1], pieces + more[2]
        queued = generated.submitted.cut if generated.unchanged else None
        table, probe, record, figures = queued or self._cut_task(step, *tables)
        figures = ray.get(figures)
        figures.update(verifier_errors=sum(s["errors"] for s in scored),
                       verifier_timeouts=sum(s["timeouts"] for s in scored),
                       generate_seconds=sum(piece["seconds"] for piece in pieces), wait_seconds=generated.wait_seconds,
                       verify_seconds=time.perf_counter() - verifying, stale_regenerated=generated.stale)
        figures.update({name: sum(s[name] for s in scored) for name in ENVIRONMENT_FAILURES if name in scored[0]})
        styles = {style: sum(s["styles"][style] for s in scored) for style in scored[0]["styles"]}  # fill's too
        figures.update(style_shares(styles, figures["samples"]))
        figures.update({key: sum(s[key] for s in scored) for key in model_reward_columns(scored[0])})  # counts
        if self.fill:
            figures.update(extra_prompts=sum(s["prompts"] for s in scored[1:]),
                           fill_capped=int(figures["informative_groups"] < self.rl.prompts_per_step))
        if self.rl.save_rollouts:
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            path = self.run.dir / "rollouts" / self.training.name / f"step-{step + 1:06d}.parquet"
            ray.get(save_rollouts.options(scheduling_strategy=here).remote(record, path.resolve()))
        return table, probe, figures

    def _fill(self, step: int, informative: int) -> tuple[tuple, tuple, list]:
        """Draw more of the prompts the step did not choose until `prompts_per_step` groups differ or the cap is
        reached, each round as many as the rate so far says are missing; generated with the actors' current
        weights (version `step`). Returns the rounds' table refs, figures and generation stats."""
        rl, seed = self.rl, self.run.job.seed
        chosen, sample_seed = step_prompts(self.prompts.num_rows, seed, step, rl.prompts_per_step)
        candidates = extra_prompts(self.prompts.num_rows, seed, step, chosen, rl.fill_max_extra_prompts)
        drawn, groups, tables, scored, generated = 0, len(chosen), (), (), []
        while informative < rl.prompts_per_step and drawn < len(candidates):
            missing = rl.prompts_per_step - informative
            want = -(-missing * groups // informative) if informative else 2 * missing
            more = self.prompts.take(candidates[drawn:drawn + want])
            more = schema.append_column(more, schema.GROUP_ID, groups + np.arange(more.num_rows))
            (table, part), part_generated, _ = self._collect(self._submit(more, sample_seed))
            part = ray.get(part)
            tables, scored, generated = tables + (table,), scored + (part,), generated + part_generated
            drawn, groups, informative = drawn + more.num_rows, groups + more.num_rows, \
                informative + part["informative_groups"]
        return tables, scored, generated
