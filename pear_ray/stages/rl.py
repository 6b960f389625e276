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
import pyarrow.parquet as pq
import ray
import torch
from tqdm import tqdm

from pear_ray.actors.learner import LearnerGroup
from pear_ray.actors.pool import ActorPool
from pear_ray.actors.roles import (
    grow_rollout_pool,
    probe_batch,
    reference_actor,
    request_rollout_capacity,
    rollout_pool,
    sync_weights,
)
from pear_ray.config import RlConfig
from pear_ray.data import schema
from pear_ray.objectives import group_advantages, informative_groups_mask
from pear_ray.stages.common import Run, latest_checkpoint, prompt_table, rollout_pieces, rollouts, with_rewards

log = logging.getLogger(__name__)


def run_rl(run: Run, variant: str, start_model: Path) -> Path:
    """GRPO from `start_model` (the variant's SFT export); returns the exported Hugging Face folder."""
    job, rl, name = run.job, run.job.rl, f"rl-{variant}"
    objective = job.rl_objective(variant)
    drop_constant = rl.drop_constant_groups and schema.ADVANTAGE in objective.columns()  # else no signal is lost
    prompts = prompt_table(run, "train")
    frozen_models = {schema.REF_LOGPROBS: lambda: run.reference(start_model), schema.TEACHER_LOGPROBS: run.teacher}
    scorers = {column: reference_actor(model(), job.resources.reference)
               for column, model in frozen_models.items() if column in objective.columns()}
    learner = LearnerGroup.for_rl(start_model, job.resources.learner, rl, temperature=job.sampling.temperature,
                                  seed=job.seed)
    pool = rollout_pool(start_model, job.resources.rollout, seed=job.seed)
    max_actors = job.resources.rollout.max_actors
    if max_actors:  # elastic: ask for the most the pool may use while RL runs
        request_rollout_capacity(job.resources.rollout, max_actors)
    try:
        start = 0
        if latest_checkpoint(run.checkpoints(name)):
            start = learner.load_checkpoint(run.checkpoints(name))["step"]
            sync_weights(learner, pool, version=start)
            log.info("%s: resuming at step %d of %d", name, start, rl.steps)
        run.metrics.truncate_after("rl", variant, start)  # rows past the checkpoint (all, from scratch) go
        generation = Generation(run, pool, prompts, name, start)
        progress = tqdm(range(start, rl.steps), desc=name, initial=start, total=rl.steps)
        for step in progress:
            started = time.perf_counter()
            if grow_rollout_pool(pool, job.resources.rollout):  # actors that came up hold start_model's weights
                sync_weights(learner, pool, version=step)
            generation.submit_until(generation_horizon(step, rl))  # with the weights the actors hold: version step
            batch, stats = generation.batch(step, learner, drop_constant=drop_constant)
            progress.set_postfix(reward=f"{stats['reward']:.3f}")
            if batch.num_rows >= job.resources.learner.num_ranks * objective.updates()[0]:
                batch_ref = ray.put(batch)
                scoring = time.perf_counter()
                for column, scorer in scorers.items():  # at the rollouts' temperature, as the policy is scored
                    batch_ref, _ = scorer.score.remote(batch_ref, column=column, temperature=job.sampling.temperature)
                if scorers:
                    ray.wait([batch_ref], fetch_local=False)
                training = time.perf_counter()
                update = learner.step(batch_ref, objective)
                stats.update(score_seconds=training - scoring, train_seconds=time.perf_counter() - training)
                update["learner_step"] = update.pop("step")  # optimizer updates so far; `step` is the RL step
                stats.update(update)
                stats.update(sync_weights(learner, pool, version=step + 1, probe_ref=probe_batch(batch)))
            else:
                log.info("%s step %d: every group's rewards were equal; no update", name, step + 1)
                pool.call_all("set_policy_version", step + 1)  # the same weights, now version step + 1
            stats.update(busy_fractions(stats, time.perf_counter() - started, len(pool.actors)))
            stats.update(rollout_actors=len(pool.actors), rollout_actors_lost=pool.stats.actors_dropped
                         + pool.stats.actors_replaced, rollout_batches_rerun=pool.stats.resubmitted)
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
            ray.kill(scorer)
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
    pieces: int


class Generation:
    """The steps' batches as the rollout pool generates them: submitted ahead (`submit_until`), collected, checked
    for staleness, scored and (fill_batch) topped up in `batch`."""

    def __init__(self, run: Run, pool: ActorPool, prompts: pa.Table, name: str, start: int):
        self.run, self.rl, self.pool, self.prompts, self.name = run, run.job.rl, pool, prompts, name
        self.submitted: dict[int, _Submitted] = {}
        self.next_step = start  # the first step not queued yet

    def submit_until(self, last: int) -> None:
        """Queue the generation of every step's batch up to `last` not queued yet, on the actors' current weights."""
        for step in range(self.next_step, last + 1):
            self.submitted[step] = self._submit_step(step)
        self.next_step = max(self.next_step, last + 1)

    def _submit_step(self, step: int) -> _Submitted:
        chosen, seed = step_prompts(self.prompts.num_rows, self.run.job.seed, step, self.rl.prompts_per_step)
        return self._submit(self.prompts.take(chosen), seed)

    def _submit(self, prompts: pa.Table, seed: int) -> _Submitted:
        pieces, _ = rollout_pieces(self.pool, prompts)
        return _Submitted(iter(self.pool.submit("generate", pieces, n=self.rl.group_size, seed=seed,
                                                **self.run.job.sampling.model_dump())), len(pieces))

    def _collect(self, submitted: _Submitted) -> tuple[pa.Table, float]:
        """The batch in prompt order and the actor-seconds it took."""
        done, seconds = {}, 0.0
        for index, ref, stats in submitted.mapping:
            done[index], seconds = ref, seconds + stats["seconds"]
        return pa.concat_tables(ray.get([done[i] for i in range(submitted.pieces)])), seconds

    def batch(self, step: int, learner: LearnerGroup, *, drop_constant: bool) -> tuple[pa.Table, dict]:
        """Step `step`'s samples with rewards and advantages, groups with no signal dropped when `drop_constant`
        (more prompts drawn until enough differ, with fill_batch); and the step's figures."""
        rl = self.rl
        waiting = time.perf_counter()
        table, generate_seconds = self._collect(self.submitted.pop(step))
        wait_seconds = time.perf_counter() - waiting
        versions = table.column(schema.POLICY_VERSION).to_numpy()
        stale = int((versions < step - rl.max_staleness).sum())
        if stale:  # an actor replaced meanwhile started from start_model's weights
            log.warning("step %d: %d samples older than %d versions; regenerating", step + 1, stale, rl.max_staleness)
            sync_weights(learner, self.pool, version=step)
            table, seconds = self._collect(self._submit_step(step))
            generate_seconds += seconds
        verifying = time.perf_counter()
        table, failures = scored(self.run, table)
        keep = (informative_groups_mask(*_rewards_and_groups(table)).numpy() if drop_constant
                else np.ones(table.num_rows, bool))
        extra = 0
        if rl.fill_batch and drop_constant:
            table, keep, extra, seconds = self._fill(step, table, keep, failures)
            generate_seconds += seconds
        verify_seconds = time.perf_counter() - verifying
        rewards = table.column(schema.REWARD).to_numpy()
        lengths = np.array([len(ids) for ids in table.column(schema.RESPONSE_IDS).to_pylist()])
        trained = table.filter(keep)
        staleness = step - trained.column(schema.POLICY_VERSION).to_numpy()
        stats = {
            "reward": float(rewards.mean()),
            "response_length": float(lengths.mean()),
            "kept_fraction": float(keep.mean()),
            "verifier_errors": failures["errors"],
            "verifier_timeouts": failures["timeouts"],
            "samples": table.num_rows,
            "generate_seconds": generate_seconds,
            "wait_seconds": wait_seconds,
            "verify_seconds": verify_seconds,
            "staleness_mean": float(staleness.mean()) if len(staleness) else 0.0,
            "staleness_max": int(staleness.max()) if len(staleness) else 0,
            "stale_regenerated": stale,
        }
        if rl.fill_batch and drop_constant:
            groups = np.unique(trained.column(schema.GROUP_ID).to_numpy()).size
            stats.update(extra_prompts=extra, informative_groups=groups,
                         fill_capped=int(groups < rl.prompts_per_step))
        if rl.save_rollouts:
            self._save(step, table, keep)
        return trained, stats

    def _fill(self, step: int, table: pa.Table, keep: np.ndarray, failures: dict):
        """Draw more of the prompts the step did not choose until `prompts_per_step` groups differ or the cap is
        reached, each round as many as the rate so far says are missing; keep the first `prompts_per_step` such
        groups. Generated with the actors' current weights (version `step`). Returns the table, its keep-mask, the
        prompts drawn and the actor-seconds."""
        rl, seed = self.rl, self.run.job.seed
        chosen, sample_seed = step_prompts(self.prompts.num_rows, seed, step, rl.prompts_per_step)
        candidates = extra_prompts(self.prompts.num_rows, seed, step, chosen, rl.fill_max_extra_prompts)
        drawn, seconds, groups = 0, 0.0, len(chosen)
        tables, keeps = [table], [keep]
        while (have := np.unique(table.column(schema.GROUP_ID).to_numpy()[keep]).size) < rl.prompts_per_step \
                and drawn < len(candidates):
            missing = rl.prompts_per_step - have
            want = -(-missing * groups // have) if have else 2 * missing
            more = self.prompts.take(candidates[drawn:drawn + want])
            more = schema.append_column(more, schema.GROUP_ID, groups + np.arange(more.num_rows))
            part, part_seconds = self._collect(self._submit(more, sample_seed))
            part, part_failures = scored(self.run, part)
            for kind, count in part_failures.items():
                failures[kind] += count
            tables.append(part)
            keeps.append(informative_groups_mask(*_rewards_and_groups(part)).numpy())
            table, keep = pa.concat_tables(tables), np.concatenate(keeps)
            drawn, seconds, groups = drawn + more.num_rows, seconds + part_seconds, groups + more.num_rows
        return table, first_groups(table.column(schema.GROUP_ID).to_numpy(), keep, rl.prompts_per_step), drawn, \
            seconds

    def _save(self, step: int, table: pa.Table, keep: np.ndarray) -> None:
        """Every sample of the step, whether trained, and the policy version that generated it."""
        folder = self.run.dir / "rollouts" / self.name
        folder.mkdir(parents=True, exist_ok=True)
        columns = (schema.ID, schema.GROUP_ID, schema.PROMPT_IDS, schema.RESPONSE_IDS, schema.ROLLOUT_LOGPROBS,
                   schema.REWARD, schema.ADVANTAGE, schema.POLICY_VERSION)
        pq.write_table(table.select(list(columns)).append_column("trained", pa.array(keep)),
                       folder / f"step-{step + 1:06d}.parquet")


def scored(run: Run, table: pa.Table) -> tuple[pa.Table, dict[str, int]]:
    """Samples with their rewards and group-normalised advantages."""
    table, failures = with_rewards(run, table)
    rewards, groups = _rewards_and_groups(table)
    advantages = group_advantages(rewards, groups, scale_by_std=run.job.rl.normalize_std)
    return schema.append_column(table, schema.ADVANTAGE, advantages.numpy()), failures


def _rewards_and_groups(table: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
    rewards = torch.tensor(table.column(schema.REWARD).to_numpy())  # float64: the verifier's exact values
    return rewards, torch.tensor(table.column(schema.GROUP_ID).to_numpy())
