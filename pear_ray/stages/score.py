"""Stage 1: an SFT dataset with behaviour log-probs, written to data/sft.parquet.

Four cases, in order: the data file already carries `behavior_logprobs` (used as they are); it has none
(scored teacher-forced by the behaviour model on the rollout/scoring pool, streaming Parquet in and out);
there is no data file and the behaviour policy is scripted (it writes the data with exact log-probs); there is
no data file (the behaviour model writes it from the task's train prompts, recording the log-prob of every
token it samples, optionally after a brief canonical SFT on the task's gold answers).

With `score.teacher_topk` = k > 0 the data also carries `teacher_topk`, the behaviour model's k most likely next
tokens at every response token, in every case: recorded as it samples or scores, exact for the scripted policy, and
for given data with behaviour log-probs but no top-k, scored by the behaviour model for the top-k alone. Columns the
data already has are used as they are.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from pear_ray.actors.elastic import scaled_by_results
from pear_ray.actors.roles import rollout_pool
from pear_ray.actors.streaming import stream_parquet
from pear_ray.data import schema
from pear_ray.data.io import load_sft_data, write_table
from pear_ray.stages.common import Run, correct_mask, prompt_table, rollouts, with_rewards
from pear_ray.stages.teacher import train_teacher
from pear_ray.tasks.addition import scripted_rows

log = logging.getLogger(__name__)


def run_score(run: Run) -> Path:
    job, target, k = run.job, run.data("sft"), run.job.score.teacher_topk
    if job.data.sft is not None:
        table = load_sft_data(job.data.sft, run.tokenizer, max_prompt_tokens=job.data.max_prompt_tokens,
                              max_response_tokens=job.data.max_response_tokens, split=job.data.sft_split,
                              columns=job.data.sft_columns)
        has_logprobs = schema.BEHAVIOR_LOGPROBS in table.column_names
        topk = k if schema.TEACHER_TOPK not in table.column_names else 0
        if has_logprobs and not topk:
            log.info("%s carries behaviour log-probs: using them as they are", job.data.sft)
            write_table(table, target)
            return target
        return score_with_behavior(run, table, target, column=None if has_logprobs else schema.BEHAVIOR_LOGPROBS,
                                   topk=topk)
    if job.models.behavior is not None and job.models.behavior.scripted is not None:
        return scripted_writes_data(run, target)
    return teacher_writes_data(run, target)


def score_with_behavior(run: Run, table: pa.Table, target: Path, *, column: str | None, topk: int) -> Path:
    """Teacher-forced behaviour log-probs (`column`, or None for none) and top-k (topk > 0) for given data,
    streamed through the scoring pool."""
    unscored = target.with_name("unscored.parquet")
    write_table(table, unscored, row_group_size=run.job.score.batch_size)
    pool = behavior_pool(run, run.behavior())
    try:
        with (tqdm(total=table.num_rows, desc=f"score ({column or schema.TEACHER_TOPK})") as progress,
              scaled_by_results(pool, run.job.resources.rollout, "score")):
            stream_parquet(pool, "score", unscored, target, progress=progress, column=column, topk=topk)
    finally:
        pool.shutdown()
    return target


def behavior_pool(run: Run, model: Path):
    """The rollout pool on the behaviour model. vLLM refuses more top-k log-probs per position than its
    max_logprobs (default 20), so with score.teacher_topk = k above that, it is raised to k; the transformers
    engine has no such cap."""
    resources, k = run.job.resources.rollout, run.job.score.teacher_topk
    engine = resources.engine
    if engine.backend == "vllm" and engine.max_logprobs != -1 and engine.max_logprobs < k:  # -1: no cap
        resources = resources.model_copy(update={"engine": engine.model_copy(update={"max_logprobs": k})})
    return rollout_pool(run.shared(model), resources, seed=run.job.seed)


def teacher_writes_data(run: Run, target: Path) -> Path:
    """The behaviour model answers the task's train prompts; its sampled-token log-probs are the behaviour
    log-probs, recorded at generation time."""
    job = run.job
    teacher = run.behavior()
    if job.score.teacher_sft_steps:
        teacher = train_teacher(run, teacher)
    prompts = prompt_table(run, "train")
    pool = behavior_pool(run, teacher)
    try:
        with scaled_by_results(pool, job.resources.rollout, "score"):
            data = rollouts(pool, prompts, n=job.score.samples_per_prompt, seed=job.seed,
                            environment=run.environment, topk=job.score.teacher_topk,
                            desc="score (teacher writes the data)",
                            **job.sampling.model_dump())
    finally:
        pool.shutdown()
    data, failures = with_rewards(run, data)
    correct = correct_mask(data, job.eval.correct_threshold)
    accuracy = float(np.mean(correct))
    if job.score.keep == "correct":
        data = data.filter(correct)
        if data.num_rows == 0:
            raise RuntimeError("the teacher answered no train prompt correctly: nothing to keep (score.keep=correct)")
    data = schema.append_column(data, schema.BEHAVIOR_LOGPROBS, data.column(schema.ROLLOUT_LOGPROBS))
    run.metrics.truncate_after("score", None, -1)  # the row of an attempt killed before the stage was recorded
    run.metrics.log("score", 0, {"teacher_accuracy": accuracy, "rows": data.num_rows, **failures})
    log.info("teacher wrote %d rows (accuracy %.3f)", data.num_rows, accuracy)
    write_table(data, target)
    return target


def scripted_writes_data(run: Run, target: Path) -> Path:
    """The scripted behaviour policy answers the task's train prompts; its log-probs are exact."""
    job, policy = run.job, run.job.models.behavior.scripted
    data = scripted_rows(prompt_table(run, "train"), run.tokenizer, policy, seed=job.seed,
                         samples_per_prompt=job.score.samples_per_prompt, topk=job.score.teacher_topk)
    sources, counts = np.unique(data.column(schema.SOURCE).to_numpy(zero_copy_only=False), return_counts=True)
    fractions = {f"{source}_fraction": count / data.num_rows for source, count in zip(sources, counts)}
    run.metrics.truncate_after("score", None, -1)  # the row of an attempt killed before the stage was recorded
    run.metrics.log("score", 0, {"rows": data.num_rows, **fractions})
    log.info("scripted policy %s wrote %d rows (%s)", policy.name, data.num_rows,
             ", ".join(f"{share:.0%} {name.removesuffix('_fraction')}" for name, share in fractions.items()))
    write_table(data, target)
    return target
