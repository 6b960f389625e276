"""How one RL step's batch is made: rules that are functions of (seed, step) alone, so a resumed run makes the same
batches, and the Ray tasks that apply them next to the samples (the driver sees references and figures only)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch
from transformers import AutoTokenizer

from pear_ray.actors.reward import RewardModels
from pear_ray.actors.roles import probe_rows
from pear_ray.config import RlConfig
from pear_ray.data import schema
from pear_ray.data.io import write_table
from pear_ray.objectives import group_advantages, informative_groups_mask
from pear_ray.rewards import VERIFIER_REWARD, combined_reward, model_reward_columns, reward_column
from pear_ray.stages.common import decoded_rewards, style_counts
from pear_ray.storage import materialize


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


@functools.cache
def cached_tokenizer(student: str):
    """The student's tokenizer on this node (`student`: where its folder lives, a path or a URL)."""
    return AutoTokenizer.from_pretrained(materialize(student))


@ray.remote(num_cpus=0.1, num_returns=2)
def score_samples(student: str, task, task_config, normalize_std: bool, *pieces: pa.Table,
                  reward_models: RewardModels | None = None) -> tuple[pa.Table, dict]:
    """Next to the samples: decode, verify (verifier tasks), score with the reward models when given (their pool,
    then the reward trained on is the combined one), group-normalise the advantages, and count the samples in each
    of the task's response styles (`styles`: {style: samples}, {} for a task without styles)."""
    table, failures = decoded_rewards(pa.concat_tables(pieces), cached_tokenizer(student), task, task_config,
                                      reward_models)
    if reward_models is not None:
        table = with_combined_reward(table, task_config)
    rewards, groups = rewards_and_groups(table)
    advantages = group_advantages(rewards, groups, scale_by_std=normalize_std)
    informative = np.unique(groups.numpy()[informative_groups_mask(rewards, groups).numpy()]).size
    styles = {style: int(counts.sum()) for style, counts in style_counts(table, task).items()}
    return schema.append_column(table, schema.ADVANTAGE, advantages.numpy()), {
        **failures, "prompts": np.unique(groups.numpy()).size, "informative_groups": informative, "styles": styles}


def with_combined_reward(table: pa.Table, task_config) -> pa.Table:
    """`reward` replaced by task.verifier_weight x verifier + the sum of weight x score over task.reward_models
    (the verifier's own kept as `verifier_reward`)."""
    models = task_config.reward_models
    verifier = table.column(schema.REWARD).to_numpy()
    scores = {model.name: table.column(reward_column(model.name)).to_numpy() for model in models}
    weights = {model.name: model.weight for model in models}
    combined = combined_reward(verifier, scores, task_config.verifier_weight, weights)
    table = schema.append_column(table, VERIFIER_REWARD, verifier, pa.float64())
    return schema.append_column(table, schema.REWARD, combined)


@ray.remote(num_cpus=0.1, num_returns=4)
def cut_batch(step: int, groups: int | None, drop_constant: bool, record: bool, *tables: pa.Table):
    """The step's batch (groups with no signal dropped when `drop_constant`, the first `groups` others when given),
    a probe of it for the mismatch metric, every sample with whether it is trained (`record`), and the figures."""
    table = pa.concat_tables(tables)
    rewards, group_ids = rewards_and_groups(table)
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
        **{column: float(np.mean(table.column(column).to_numpy())) for column in model_reward_columns(
            table.column_names)},  # the reward models' mean scores, and the verifier's part
    }
    columns = (schema.ID, schema.GROUP_ID, schema.PROMPT_IDS, schema.RESPONSE_IDS, schema.ROLLOUT_LOGPROBS,
               schema.REWARD, schema.ADVANTAGE, schema.POLICY_VERSION)
    columns += tuple(name for name in (schema.POLICY_MASK,) if name in table.column_names)  # episodes' own
    saved = table.select(list(columns)).append_column("trained", pa.array(keep)) if record else None
    return trained, probe_rows(trained), saved, stats


def rewards_and_groups(table: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
    rewards = torch.tensor(table.column(schema.REWARD).to_numpy())  # float64: the verifier's exact values
    return rewards, torch.tensor(table.column(schema.GROUP_ID).to_numpy())


@ray.remote(num_cpus=0)
def save_rollouts(table: pa.Table, path: Path) -> None:
    """rl.save_rollouts: a step's samples written into the run folder on the driver's node, not through the driver."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_table(table, path)
