"""Stage 3: RL from an SFT checkpoint: GRPO, on-policy distillation, or a plug-in objective.

Each step: G samples for each of `prompts_per_step` train prompts from the rollout service, verifier rewards
in Ray tasks, group-normalised advantages, groups whose rewards are all equal dropped (when the objective reads
the advantage), the frozen models' log-probs the objective reads (the reference's for a KL term, the teacher's for
on-policy distillation), the objective's updates on the learner, then the new weights go to the rollout service.
Resumable from the checkpoint of every `checkpoint_every` steps: a step's prompts and sampling seed depend only on
(seed, step), so a resumed run sees what an uninterrupted one would.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import ray
import torch
from tqdm import tqdm

from pear_ray.actors.learner import LearnerGroup
from pear_ray.actors.roles import (
    grow_rollout_pool,
    probe_batch,
    reference_actor,
    request_rollout_capacity,
    rollout_pool,
    sync_weights,
)
from pear_ray.data import schema
from pear_ray.objectives import group_advantages, informative_groups_mask
from pear_ray.stages.common import Run, prompt_table, resume, rollouts, with_rewards

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
        start = resume(run, learner, name, "rl", variant)
        if start:
            sync_weights(learner, pool, version=start)
        progress = tqdm(range(start, rl.steps), desc=name, initial=start, total=rl.steps)
        for step in progress:
            if grow_rollout_pool(pool, job.resources.rollout):  # actors that came up hold start_model's weights
                sync_weights(learner, pool, version=step)
            rng = np.random.default_rng([job.seed, step])
            chosen = prompts.take(rng.choice(prompts.num_rows, size=min(rl.prompts_per_step, prompts.num_rows),
                                             replace=False))
            batch, stats = rollout_batch(run, pool, chosen, seed=int(rng.integers(2**31)), drop_constant=drop_constant)
            progress.set_postfix(reward=f"{stats['reward']:.3f}")
            if batch.num_rows >= job.resources.learner.num_ranks * objective.updates()[0]:
                batch_ref = ray.put(batch)
                for column, scorer in scorers.items():  # at the rollouts' temperature, as the policy is scored
                    batch_ref, _ = scorer.score.remote(batch_ref, column=column, temperature=job.sampling.temperature)
                update = learner.step(batch_ref, objective)
                update["learner_step"] = update.pop("step")  # optimizer updates so far; `step` is the RL step
                stats.update(update)
                stats.update(sync_weights(learner, pool, version=step + 1, probe_ref=probe_batch(batch)))
            else:
                log.info("%s step %d: every group's rewards were equal; no update", name, step + 1)
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


def rollout_batch(run: Run, pool, prompts, *, seed: int, drop_constant: bool):
    """Samples with rewards and advantages; groups with no signal dropped when `drop_constant`."""
    rl = run.job.rl
    table = rollouts(pool, prompts, n=rl.group_size, seed=seed, **run.job.sampling.model_dump())
    table, failures = with_rewards(run, table)
    rewards = torch.tensor(table.column(schema.REWARD).to_numpy())  # float64: the verifier's exact values
    groups = torch.tensor(table.column(schema.GROUP_ID).to_numpy())
    advantages = group_advantages(rewards, groups, scale_by_std=rl.normalize_std)
    table = schema.append_column(table, schema.ADVANTAGE, advantages.numpy())
    keep = informative_groups_mask(rewards, groups) if drop_constant else torch.ones_like(groups, dtype=bool)
    lengths = np.array([len(ids) for ids in table.column(schema.RESPONSE_IDS).to_pylist()])
    stats = {
        "reward": float(rewards.mean()),
        "response_length": float(lengths.mean()),
        "kept_fraction": float(keep.float().mean()),
        "verifier_errors": failures["errors"],
        "verifier_timeouts": failures["timeouts"],
        "samples": table.num_rows,
    }
    return table.filter(keep.numpy()), stats
