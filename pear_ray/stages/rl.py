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

import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from pear_ray.actors.learner import LearnerGroup
from pear_ray.actors.pool import ActorPool
from pear_ray.actors.roles import (
    grow_rollout_pool,
    probe_rows,
    reference_pool,
    request_rollout_capacity,
    rollout_pool,
    sync_weights,
)
from pear_ray.config import RlConfig
from pear_ray.data import schema
from pear_ray.objectives import group_advantages, informative_groups_mask
from pear_ray.stages.common import Run, decoded_rewards, prompt_table, resume, rollout_pieces

log = logging.getLogger(__name__)


def run_rl(run: Run, variant: str, start_model: Path) -> Path:
    """GRPO from `start_model` (the variant's SFT export); returns the exported Hugging Face folder."""
    job, rl, name = run.job, run.job.rl, f"rl-{variant}"
    objective = job.rl_objective(variant)
    drop_constant = rl.drop_constant_groups and schema.ADVANTAGE in objective.columns()  # else no signal is lost
    prompts = prompt_table(run, "train")
    frozen_models = {schema.REF_LOGPROBS: lambda: run.reference(start_model), schema.TEACHER_LOGPROBS: run.teacher}
    scorers = {column: reference_pool(model(), job.resources.reference)
               for column, model in frozen_models.items() if column in objective.columns()}
    learner = LearnerGroup.for_rl(start_model, job.resources.learner, rl, temperature=job.sampling.temperature,
                                  seed=job.seed)
    pool = rollout_pool(start_model, job.resources.rollout, seed=job.seed)
    max_actors = job.resources.rollout.max_actors
    if max_actors:  # elastic: ask for the most the pool may use while RL runs
        request_rollout_capacity(job.resources.rollout, max_actors)
    try:
        start = resume(run, learner, name, "rl", variant)
        if start:
            sync_weights(learner, pool, version=start)
        generation = Generation(run, pool, prompts, name, start, drop_constant=drop_constant)
        progress = tqdm(range(start, rl.steps), desc=name, initial=start, total=rl.steps)
        for step in progress:
            started = time.perf_counter()
            if grow_rollout_pool(pool, job.resources.rollout):  # actors that came up hold start_model's weights
                sync_weights(learner, pool, version=step)
            generation.submit_until(generation_horizon(step, rl))  # with the weights the actors hold: version step
            batch_ref, probe_ref, stats = generation.batch(step, learner)
            progress.set_postfix(reward=f"{stats['reward']:.3f}")
            if stats["trained_samples"] >= job.resources.learner.num_ranks * objective.updates()[0]:
                scoring = time.perf_counter()
                for column, scorer in scorers.items():  # at the rollouts' temperature, as the policy is scored
                    [(_, batch_ref, _)] = scorer.map("score", [batch_ref], column=column,
                                                     temperature=job.sampling.temperature)
                training = time.perf_counter()
                update = learner.step(batch_ref, objective)
                stats.update(score_seconds=training - scoring, train_seconds=time.perf_counter() - training)
                update["learner_step"] = update.pop("step")  # optimizer updates so far; `step` is the RL step
                stats.update(update)
                stats.update(sync_weights(learner, pool, version=step + 1, probe_ref=probe_ref,  # then the next
                                          then=lambda s=step + 1: generation.submit_until(generation_horizon(s, rl))))
            else:
                log.info("%s step %d: every group's rewards were equal; no update", name, step + 1)
                pool.call_all("set_policy_version", step + 1)  # the same weights, now version step + 1
            stats.update(busy_fractions(stats, time.perf_counter() - started, len(pool.actors)))
            stats.update(rollout_actors=len(pool.actors), rollout_actors_lost=pool.stats.actors_dropped
                         + pool.stats.actors_replaced, rollout_batches_rerun=pool.stats.resubmitted,
                         reference_actors_replaced=sum(scorer.stats.actors_replaced for scorer in scorers.values()))
            run.metrics.log("rl", step + 1, stats, variant=variant)
            if (step + 1) % rl.checkpoint_every == 0 and step + 1 < rl.steps:
                learner.save_checkpoint(run.checkpoints(name), {"step": step + 1})
        learner.export_hf(run.model(name))
    finally:
        if max_actors:
            request_rollout_capacity(job.resources.rollout, 0)
        learner.shutdown()
        pool.shutdown()
        for scorer in scorers.values():
            scorer.shutdown()
    return run.model(name)


def generation_horizon(step: int, rl: RlConfig) -> int:
    """The last step whose batch may be generated at `step` (actors at version `step`): k steps ahead, but not
    past the current checkpoint interval, whose successor starts (or resumes) from its checkpoint's weights."""
    next_checkpoint = (step // rl.checkpoint_every + 1) * rl.checkpoint_every
    return min(step + rl.max_staleness, next_checkpoint - 1, rl.steps - 1)


def step_prompts(num_prompts: int, seed: int, step: int, count: int) -> tuple[np.ndarray, int]:
    """A step's prompt indices and sampling seed: functions of (seed, step) alone."""
    rng = np.random.default_rng([seed, step])
    chosen = rng.choice(num_prompts, size=min(count, num_prompts), replace=False)
    return chosen, int(rng.integers(2**31))


def extra_prompts(num_prompts: int, seed: int, step: int, chosen: np.ndarray, cap: int) -> np.ndarray:
    """fill_batch: the prompts a step may draw beyond its own, in an order fixed by (seed, step)."""
    order = np.random.default_rng([seed, step, 1]).permutation(num_prompts)
    return order[~np.isin(order, chosen)][:cap]


def first_groups(groups: np.ndarray, keep: np.ndarray, count: int) -> np.ndarray:
    """`keep` narrowed to its first `count` groups, in the order they appear."""
    kept = groups[keep]
    _, first = np.unique(kept, return_index=True)
    return keep & np.isin(groups, kept[np.sort(first)][:count])


def busy_fractions(stats: dict, seconds: float, actors: int) -> dict[str, float]:
    """The share of the step's wall time the rollout actors spent generating and the learner training."""
    return {"step_seconds": seconds, "rollout_busy": stats["generate_seconds"] / max(actors, 1) / seconds,
            "learner_busy": stats.get("train_seconds", 0.0) / seconds}


@dataclass
class _Submitted:
    mapping: Iterator
    refs: list[ray.ObjectRef]  # the pieces' batches, in prompt order
    scored: tuple[ray.ObjectRef, ray.ObjectRef]  # the scoring task queued on them: (table, figures)
    cut: tuple | None = None  # the step's cut queued behind the scoring, when nothing is added to it (no fill)


class Generation:
    """The steps' batches as the rollout pool generates them: submitted ahead (`submit_until`), checked for
    staleness, scored and (fill_batch) topped up in `batch`. The samples stay in the object store: decoding,
    verifying, advantages and the batch's cut run in Ray tasks on them, the driver sees references and figures."""

    def __init__(self, run: Run, pool: ActorPool, prompts: pa.Table, name: str, start: int, *, drop_constant: bool):
        self.run, self.rl, self.pool, self.prompts, self.name = run, run.job.rl, pool, prompts, name
        self.drop_constant = drop_constant  # groups with no signal are dropped (more drawn with fill_batch)
        self.fill = self.rl.fill_batch and drop_constant
        self.submitted: dict[int, _Submitted] = {}
        self.next_step = start  # the first step not queued yet
        self.task_ref = ray.put(run.task)

    def submit_until(self, last: int) -> None:
        """Queue the generation of every step's batch up to `last` not queued yet, on the actors' current weights."""
        for step in range(self.next_step, last + 1):
            self.submitted[step] = self._submit_step(step)
        self.next_step = max(self.next_step, last + 1)

    def _submit_step(self, step: int) -> _Submitted:
        """A step's generation, its scoring and (without fill) its cut, queued to run without the driver."""
        chosen, seed = step_prompts(self.prompts.num_rows, self.run.job.seed, step, self.rl.prompts_per_step)
        submitted = self._submit(self.prompts.take(chosen), seed)
        if not self.fill:
            submitted.cut = self._cut(step, submitted.scored[0])
        return submitted

    def _cut(self, step: int, *tables: ray.ObjectRef) -> tuple:
        return _cut_task.remote(step, self.rl.prompts_per_step if self.fill else None, self.drop_constant,
                                self.rl.save_rollouts, *tables)

    def _submit(self, prompts: pa.Table, seed: int) -> _Submitted:
        """Queue the prompts' generation, and its scoring behind it: a Ray task that starts when the samples
        are there, without the driver."""
        pieces, _ = rollout_pieces(self.pool, prompts)
        mapping = self.pool.submit("generate", pieces, n=self.rl.group_size, seed=seed,
                                   **self.run.job.sampling.model_dump())
        return _Submitted(iter(mapping), mapping.refs(), self._score(mapping.refs()))

    def _score(self, pieces: list[ray.ObjectRef]) -> tuple[ray.ObjectRef, ray.ObjectRef]:
        return _score_task.remote(self.run.student, self.task_ref, self.run.job.task, self.rl.normalize_std, *pieces)

    def _collect(self, submitted: _Submitted) -> tuple[tuple[ray.ObjectRef, ray.ObjectRef], list[dict], bool]:
        """Once generated: refs of the samples scored and of its figures, the pieces' generation stats (rows,
        actor-seconds, policy version), and whether every piece is the one first queued. Pieces re-run on another
        actor (theirs died) are scored again."""
        done = {}
        for index, ref, stats in submitted.mapping:
            done[index] = ref, stats
        pieces, generated = zip(*(done[i] for i in range(len(done))))
        unchanged = list(pieces) == submitted.refs
        return (submitted.scored if unchanged else self._score(list(pieces))), list(generated), unchanged

    def batch(self, step: int, learner: LearnerGroup) -> tuple[ray.ObjectRef, ray.ObjectRef, dict]:
        """Step `step`'s samples with rewards and advantages, groups with no signal dropped when `drop_constant`
        (more prompts drawn until enough differ, with fill_batch): refs of the batch and of a probe of it, and the
        step's figures."""
        rl = self.rl
        waiting = time.perf_counter()
        submitted = self.submitted.pop(step)
        (table, first), generated, unchanged = self._collect(submitted)
        wait_seconds = time.perf_counter() - waiting
        stale = sum(piece["rows"] for piece in generated if piece["policy_version"] < step - rl.max_staleness)
        if stale:  # an actor replaced meanwhile started from start_model's weights
            log.warning("step %d: %d samples older than %d versions; regenerating", step + 1, stale, rl.max_staleness)
            sync_weights(learner, self.pool, version=step)
            submitted = self._submit_step(step)
            (table, first), regenerated, unchanged = self._collect(submitted)
            generated += regenerated
        verifying = time.perf_counter()
        tables, scored = (table,), (ray.get(first),)
        if self.fill:
            more = self._fill(step, scored[0]["informative_groups"])
            tables, scored, generated = tables + more[0], scored + more[1], generated + more[2]
        table, probe, record, stats = submitted.cut if unchanged and submitted.cut else self._cut(step, *tables)
        stats = ray.get(stats)
        verify_seconds = time.perf_counter() - verifying
        stats.update(verifier_errors=sum(s["errors"] for s in scored), verifier_timeouts=sum(s["timeouts"]
                                                                                             for s in scored),
                     generate_seconds=sum(piece["seconds"] for piece in generated), wait_seconds=wait_seconds,
                     verify_seconds=verify_seconds, stale_regenerated=stale)
        if self.fill:
            stats.update(extra_prompts=sum(s["prompts"] for s in scored[1:]),
                         fill_capped=int(stats["informative_groups"] < rl.prompts_per_step))
        if rl.save_rollouts:
            folder = self.run.dir / "rollouts" / self.name
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(ray.get(record), folder / f"step-{step + 1:06d}.parquet")
        return table, probe, stats

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


@functools.cache
def _tokenizer(student: Path):
    return AutoTokenizer.from_pretrained(student)


@ray.remote(num_cpus=0.1, num_returns=2)
def _score_task(student: Path, task, task_config, normalize_std: bool, *pieces: pa.Table) -> tuple[pa.Table, dict]:
    """Next to the samples: decode, verify (verifier tasks), group-normalise the advantages."""
    table, failures = decoded_rewards(pa.concat_tables(pieces), _tokenizer(student), task, task_config)
    rewards, groups = _rewards_and_groups(table)
    advantages = group_advantages(rewards, groups, scale_by_std=normalize_std)
    informative = np.unique(groups.numpy()[informative_groups_mask(rewards, groups).numpy()]).size
    return schema.append_column(table, schema.ADVANTAGE, advantages.numpy()), {
        **failures, "prompts": np.unique(groups.numpy()).size, "informative_groups": informative}


@ray.remote(num_cpus=0.1, num_returns=4)
def _cut_task(step: int, groups: int | None, drop_constant: bool, record: bool, *tables: pa.Table):
    """The step's batch (groups with no signal dropped when `drop_constant`, the first `groups` others when given),
    a probe of it for the mismatch metric, every sample with whether it is trained (`record`), and the figures."""
    table = pa.concat_tables(tables)
    rewards, group_ids = _rewards_and_groups(table)
    keep = informative_groups_mask(rewards, group_ids).numpy() if drop_constant else np.ones(table.num_rows, bool)
    if groups is not None:
        keep = first_groups(group_ids.numpy(), keep, groups)
    lengths = np.array([len(ids) for ids in table.column(schema.RESPONSE_IDS).to_pylist()])
    trained = table.filter(keep)
    staleness = step - trained.column(schema.POLICY_VERSION).to_numpy()
    stats = {
        "reward": float(rewards.mean()),
        "response_length": float(lengths.mean()),
        "kept_fraction": float(torch.from_numpy(keep).float().mean()),  # float32, as it always was
        "samples": table.num_rows,
        "trained_samples": trained.num_rows,
        "staleness_mean": float(staleness.mean()) if len(staleness) else 0.0,
        "staleness_max": int(staleness.max()) if len(staleness) else 0,
        "informative_groups": np.unique(group_ids.numpy()[keep]).size,
    }
    columns = (schema.ID, schema.GROUP_ID, schema.PROMPT_IDS, schema.RESPONSE_IDS, schema.ROLLOUT_LOGPROBS,
               schema.REWARD, schema.ADVANTAGE, schema.POLICY_VERSION)
    saved = table.select(list(columns)).append_column("trained", pa.array(keep)) if record else None
    return trained, probe_rows(trained), saved, stats


def _rewards_and_groups(table: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
    rewards = torch.tensor(table.column(schema.REWARD).to_numpy())  # float64: the verifier's exact values
    return rewards, torch.tensor(table.column(schema.GROUP_ID).to_numpy())
