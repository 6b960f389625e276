"""Stage 3: GRPO from an SFT checkpoint.

Each step: G samples for each of `prompts_per_step` train prompts from the rollout service, verifier rewards
in Ray tasks, group-normalised advantages, groups whose rewards are all equal dropped, the reference's
log-probs when there is a KL term, clipped-surrogate updates on the learner, then the new weights go to the
rollout service. Resumable from the checkpoint of every `checkpoint_every` steps: a step's prompts and
sampling seed depend only on (seed, step), so a resumed run sees what an uninterrupted one would.
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
from pear_ray.stages.common import Run, latest_checkpoint, prompt_table, rollouts, with_rewards

log = logging.getLogger(__name__)


def run_rl(run: Run, variant: str, start_model: Path) -> Path:
    """GRPO from `start_model` (the variant's SFT export); returns the exported Hugging Face folder."""
    job, rl, name = run.job, run.job.rl, f"rl-{variant}"
    prompts = prompt_table(run, "train")
    learner = LearnerGroup.for_rl(start_model, job.resources.learner, rl, temperature=job.sampling.temperature,
                                  seed=job.seed)
    pool = rollout_pool(start_model, job.resources.rollout, seed=job.seed)
    reference = reference_actor(run.reference(start_model), job.resources.reference) if rl.kl_coef > 0 else None
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
        for step in tqdm(range(start, rl.steps), desc=name, initial=start, total=rl.steps):
            if grow_rollout_pool(pool, job.resources.rollout):  # actors that came up hold start_model's weights
                sync_weights(learner, pool, version=step)
            rng = np.random.default_rng([job.seed, step])
            chosen = prompts.take(rng.choice(prompts.num_rows, size=min(rl.prompts_per_step, prompts.num_rows),
                                             replace=False))
            batch, stats = rollout_batch(run, pool, chosen, seed=int(rng.integers(2**31)))
            if batch.num_rows >= job.resources.learner.num_ranks * rl.minibatches:
                batch_ref = ray.put(batch)
                if reference is not None:
                    batch_ref, _ = reference.score.remote(batch_ref, column=schema.REF_LOGPROBS,
                                                          temperature=job.sampling.temperature)
                update = learner.rl_step(batch_ref)
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
        if reference is not None:
            ray.kill(reference)
    return run.model(name)


def rollout_batch(run: Run, pool, prompts, *, seed: int):
    """Samples with rewards and advantages; groups with no signal are dropped when the job asks."""
    rl = run.job.rl
    table = rollouts(pool, prompts, n=rl.group_size, seed=seed, **run.job.sampling.model_dump())
    table, failures = with_rewards(run, table)
    rewards = torch.tensor(table.column(schema.REWARD).to_numpy())  # float64: the verifier's exact values
    groups = torch.tensor(table.column(schema.GROUP_ID).to_numpy())
    advantages = group_advantages(rewards, groups, scale_by_std=rl.normalize_std)
    table = schema.append_column(table, schema.ADVANTAGE, advantages.numpy())
    keep = informative_groups_mask(rewards, groups) if rl.drop_constant_groups else torch.ones_like(groups, dtype=bool)
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
