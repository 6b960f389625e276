"""The rollout/scoring service: one engine per actor (`resources.rollout.engine`: vLLM, or transformers for small
CPU models), Arrow batches in, Arrow batches out.

Methods that return a batch return two objects, the batch and a small stats dict, so the driver can wait on
(and learn of failures from) the stats without pulling the batch through itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import ray
import torch

from pear_ray import faults
from pear_ray.actors.pool import batch_stats
from pear_ray.config import EngineOptions
from pear_ray.data import schema
from pear_ray.engines.adapters import AdapterWeights
from pear_ray.engines.backends import start_engine
from pear_ray.engines.rollout_engine import RolloutEngine, Sample, seed_per_prompt
from pear_ray.environments.base import ENV_ERROR, ENV_TIMEOUT
from pear_ray.environments.episodes import Episode, play_episodes
from pear_ray.environments.stepping import step_environments
from pear_ray.runtime import use_assigned_cpus
from pear_ray.storage import materialize
from pear_ray.tasks.base import load_metadata

if TYPE_CHECKING:
    from pear_ray.tasks.build import EpisodicTask

log = logging.getLogger(__name__)

GENERATED = (schema.RESPONSE_IDS, schema.ROLLOUT_LOGPROBS, schema.FINISH_REASON, schema.POLICY_VERSION,
             schema.TEACHER_TOPK)
DEFAULT_TURN_TOKENS = 32  # an episode's tokens per assistant turn, as generate's max_tokens


class RolloutWorker:
    """Generates responses with their sampled-token log-probs, scores given responses teacher-forced, and takes
    new weights (or a new LoRA adapter) from the learner in place; every sample records the policy version that
    produced it. With topk > 0 either also records this model's top-k next tokens at every response token
    (`teacher_topk`)."""

    def __init__(self, model_dir: str | Path, *, seed: int = 0, engine: EngineOptions | None = None,
                 model: torch.nn.Module | None = None):
        """`model_dir`: where the model folder lives (a path, or a URL this node fetches); `model`: a loaded model of
        the folder to serve without a copy where the backend can (see start_engine)."""
        use_assigned_cpus()
        self.model_dir = materialize(model_dir)
        self.engine: RolloutEngine = start_engine(self.model_dir, engine, seed=seed, model=model)
        self.policy_version = 0
        self.tokenizer = None  # loaded by the first episodes call

    @ray.method(num_returns=2)
    def generate(self, prompts: pa.Table, *, n: int = 1, seed: int | None = None, topk: int = 0, **sampling: Any):
        """n samples per prompt row; the output has one row per sample, the prompt's columns repeated."""
        started = time.perf_counter()
        prompts = schema.validate(prompts, required=(schema.PROMPT_IDS,), vocab_size=self.engine.vocab_size)
        samples = self.engine.generate(prompts.column(schema.PROMPT_IDS).to_pylist(), n=n,
                                       seed=_prompt_seeds(prompts, n, seed), topk=topk, **sampling)
        out = self._samples_table(prompts, n, [sample for row in samples for sample in row], topk)
        return out, batch_stats(out.num_rows, schema.response_token_count(out), started,
                                policy_version=self.policy_version)

    @ray.method(num_returns=2)
    def episodes(self, prompts: pa.Table, *, environment: EpisodicTask, n: int = 1, seed: int | None = None,
                 topk: int = 0, max_tokens: int = DEFAULT_TURN_TOKENS, **sampling: Any):
        """n multi-turn episodes per prompt row against `environment` (environments/episodes.py): the table is
        `generate`'s, each response the whole trajectory (the policy's turns and the environment's answers as ids),
        plus `policy_mask` and `reward` (the sum of the steps' rewards; 0 when the environment failed). `max_tokens`
        bounds each turn. No `topk`: the environment's tokens have no sampling distribution to take one from. The
        stats add the episodes their environment failed (`env_errors`, `env_timeouts`) and the engine's prompt tokens
        and prefix-cache hits over the call (`prompt_tokens`, `cached_tokens`)."""
        started = time.perf_counter()
        if topk:
            raise ValueError(f"episodes: topk={topk} is not supported (the environment's tokens have no top-k)")
        prompts = schema.validate(prompts, required=(schema.PROMPT_IDS,), vocab_size=self.engine.vocab_size)
        prompt_ids = prompts.column(schema.PROMPT_IDS).to_pylist()
        timeout_s = environment.config.step_timeout_s

        def generate(contexts: list[list[int]], turn_seeds: list[int | None], turn_tokens: int) -> list[Sample]:
            rows = self.engine.generate(contexts, seed=turn_seeds, max_tokens=turn_tokens, **sampling)
            return [row[0] for row in rows]

        prefill_before = dict(self.engine.prefill_counts)
        played = play_episodes(
            prompt_ids, _environment_rows(prompts), seed_per_prompt(_prompt_seeds(prompts, n, seed), prompt_ids), n=n,
            make_env=environment.environment(), generate=generate,
            step=lambda envs, actions: step_environments(envs, actions, timeout_s), tokenizer=self._tokenizer(),
            max_turns=environment.config.max_turns, max_tokens=max_tokens, max_model_len=self.engine.max_model_len)
        out = self._samples_table(prompts, n, played, topk=0)
        out = schema.append_column(out, schema.POLICY_MASK, [e.policy_mask for e in played])
        out = schema.append_column(out, schema.REWARD, [e.reward for e in played])
        reasons = [e.finish_reason for e in played]
        if failed := [e.message for e in played if e.message]:
            log.warning("environment %s: %d errors, %d timeouts (> %gs) in %d episodes; first: %s",
                        environment.config.kind, reasons.count(ENV_ERROR), reasons.count(ENV_TIMEOUT), timeout_s,
                        len(played), failed[:3])
        prefill = {key: count - prefill_before[key] for key, count in self.engine.prefill_counts.items()}
        return out, batch_stats(out.num_rows, schema.response_token_count(out), started,
                                policy_version=self.policy_version, env_errors=reasons.count(ENV_ERROR),
                                env_timeouts=reasons.count(ENV_TIMEOUT), **prefill)

    def _samples_table(self, prompts: pa.Table, n: int, samples: Sequence[Sample | Episode], topk: int) -> pa.Table:
        """One row per sample (n per prompt row, in order): the prompt's columns repeated, its group id, sample id
        `<row id>/<j>`, the sampled ids with their log-probs, finish reason and policy version (and top-k)."""
        out = prompts.drop_columns([c for c in GENERATED if c in prompts.column_names])
        out = out.take(np.repeat(np.arange(prompts.num_rows), n))
        if schema.GROUP_ID not in out.column_names:
            out = schema.append_column(out, schema.GROUP_ID, np.repeat(np.arange(prompts.num_rows), n))
        sample_ids = [f"{row_id}/{j}" for row_id in _row_ids(prompts) for j in range(n)]
        out = schema.append_column(out, schema.ID, sample_ids)
        out = schema.append_column(out, schema.RESPONSE_IDS, [s.response_ids for s in samples])
        out = schema.append_column(out, schema.ROLLOUT_LOGPROBS, [s.logprobs for s in samples])
        out = schema.append_column(out, schema.FINISH_REASON, [s.finish_reason for s in samples])
        out = schema.append_column(out, schema.POLICY_VERSION, [self.policy_version] * len(samples))
        if topk:
            out = schema.append_column(out, schema.TEACHER_TOPK, [s.topk for s in samples])
        return out

    def _tokenizer(self):
        """The model folder's tokenizer, loaded at the first episodes call (generation alone never needs it)."""
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return self.tokenizer

    @ray.method(num_returns=2)
    def score(self, table: pa.Table, column: str | None = schema.BEHAVIOR_LOGPROBS, temperature: float = 1.0,
              topk: int = 0):
        """Add `column`: the teacher-forced log-prob of every response token under this engine's weights, of
        logits / temperature; with topk > 0 also `teacher_topk` (column None: that alone, e.g. for data whose
        behaviour log-probs are given). At the environment's tokens of a multi-turn row: 0.0 and no top-k."""
        started = time.perf_counter()
        table = schema.validate(table, vocab_size=self.engine.vocab_size)
        prompts = table.column(schema.PROMPT_IDS).to_pylist()
        responses = table.column(schema.RESPONSE_IDS).to_pylist()
        scored = self.engine.score(prompts, responses, temperature, topk)
        logprobs, topks = scored if topk else (scored, None)
        logprobs = schema.blank_environment_tokens(table, logprobs, 0.0)
        out = table
        if column is not None:
            out = schema.append_column(out, column, logprobs, schema.LOGPROBS_TYPE)
        if topk:
            out = schema.append_column(out, schema.TEACHER_TOPK, schema.blank_environment_tokens(table, topks, []))
        return out, batch_stats(out.num_rows, schema.response_token_count(out), started,
                                policy_version=self.policy_version)

    def update_weights(self, weights: dict[str, Any] | Iterable[tuple[str, Any]], version: int) -> int:
        """Load the learner's weights (HF names; a dict or (name, tensor) pairs) without restarting the engine;
        samples after this carry `version`."""
        faults.kill_point("weight-sync")  # the weights are here, the engine still holds the old ones
        self.engine.update_weights(weights.items() if isinstance(weights, dict) else weights)
        self.policy_version = version
        return version

    def update_adapter(self, adapter: AdapterWeights, version: int) -> int:
        """Serve base + the learner's LoRA adapter (replacing the one before) without restarting the engine: a policy
        version that costs the adapter's bytes; samples after this carry `version`."""
        faults.kill_point("weight-sync")  # the adapter is here, the engine still serves the old policy
        self.engine.update_adapter(adapter)
        self.policy_version = version
        return version

    def set_policy_version(self, version: int) -> int:
        """Relabel the weights after an RL step that made no update (they are that version's too)."""
        self.policy_version = version
        return version

    def health(self) -> dict[str, Any]:
        return {**self.engine.health(), "policy_version": self.policy_version,
                "torch_threads": torch.get_num_threads()}


def _prompt_seeds(prompts: pa.Table, n: int, seed: int | None) -> int | list[int] | None:
    """`generate`'s seed argument: with group ids, a seed per prompt (seed + n * group), stable however the prompts
    are split into batches; else the seed as given."""
    if seed is not None and schema.GROUP_ID in prompts.column_names:
        return [seed + n * int(group) for group in prompts.column(schema.GROUP_ID).to_pylist()]
    return seed


def _environment_rows(prompts: pa.Table) -> list[dict[str, Any]]:
    """What an environment's reset gets of each prompt row: its id, prompt text, answer and metadata (a dict)."""
    columns = [c for c in (schema.PROMPT, schema.ANSWER) if c in prompts.column_names]
    metadata = (prompts.column(schema.METADATA).to_pylist() if schema.METADATA in prompts.column_names
                else [None] * prompts.num_rows)
    return [{schema.ID: row_id, **{c: prompts.column(c)[i].as_py() for c in columns},
             schema.METADATA: load_metadata(meta)}
            for i, (row_id, meta) in enumerate(zip(_row_ids(prompts), metadata, strict=True))]


def _row_ids(table: pa.Table) -> list[str]:
    if schema.ID in table.column_names:
        return table.column(schema.ID).to_pylist()
    return [str(i) for i in range(table.num_rows)]

