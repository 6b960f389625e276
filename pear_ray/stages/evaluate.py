"""Stage 4: pass@1 and pass@k on the held-out prompts (unbiased estimator over n samples per prompt), and the
per-prompt correct counts behind them as Parquet (`eval/<stage>-<variant>.parquet`). For a task with response styles,
also the share of samples in each style (`share_<style>`) and the per-prompt counts behind it (`style_<style>`). With
task.reward_models, each model's mean score (`reward_<name>`) and counts; pass@k stays on the verifier's reward."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from pear_ray.actors.elastic import scaled_by_results
from pear_ray.actors.roles import rollout_pool
from pear_ray.data import schema
from pear_ray.data.io import write_table
from pear_ray.objectives import mean_pass_at_k
from pear_ray.rewards import model_reward_columns
from pear_ray.stages.common import (
    ENVIRONMENT_FAILURES,
    Run,
    correct_counts,
    prompt_table,
    rollouts,
    start_reward_models,
    style_counts,
    style_shares,
    with_rewards,
)
from pear_ray.tracking import eval_stage
from pear_ray.tracking.metrics import style_column

log = logging.getLogger(__name__)


def write_per_prompt(path: Path, prompts: pa.Table, correct: np.ndarray, *, n: int, stage: str, variant: str,
                     seed: int, styles: dict[str, np.ndarray] | None = None) -> None:
    """Correct samples per held-out prompt, and per style in `styles` (style_counts) the samples in it, so paired
    tests and later analysis need no rerun."""
    rows = prompts.num_rows
    write_table(pa.table({
        "prompt_id": prompts.column(schema.ID),
        "n": pa.array([n] * rows, pa.int32()),
        "correct": pa.array(correct, pa.int32()),
        **{style_column(style): pa.array(counts, pa.int32()) for style, counts in (styles or {}).items()},
        "stage": pa.array([stage] * rows),
        "variant": pa.array([variant] * rows),
        "seed": pa.array([seed] * rows, pa.int64()),
    }), path)


def run_eval(run: Run, variant: str, model: Path, after: str) -> dict[str, float]:
    """Evaluate `model` (the variant's checkpoint after stage `after`) and log `eval_<after>` metrics."""
    job = run.job
    prompts = prompt_table(run, "eval")
    scored, failures = [], Counter()

    def score(piece: pa.Table) -> dict[str, str]:
        """Verify a piece as it arrives (the pool goes on generating); pass@k so far, for the progress bar."""
        piece, piece_failures = with_rewards(run, piece, reward_models)
        scored.append(piece)
        failures.update(piece_failures)
        so_far = correct_counts(pa.concat_tables(scored), job.eval.correct_threshold).tolist()
        return {f"pass@{k}": f"{mean_pass_at_k(so_far, job.eval.n, k):.3f}" for k in job.eval.k}

    pool = rollout_pool(run.shared(model), job.resources.rollout, seed=job.seed)
    reward_models = start_reward_models(run)
    try:
        sampling = job.sampling.model_dump() | {"temperature": job.eval.temperature}
        with scaled_by_results(pool, job.resources.rollout, "eval"):
            rollouts(pool, prompts, n=job.eval.n, seed=job.seed, environment=run.environment,
                     desc=f"eval {after}-{variant}", on_piece=score,
                     **sampling)
    finally:
        pool.shutdown()
        if reward_models is not None:
            reward_models.shutdown()
    table = pa.concat_tables(scored)
    correct = correct_counts(table, job.eval.correct_threshold)  # in group (prompt) order, however pieces arrived
    styles = style_counts(table, run.task)
    write_per_prompt(run.per_prompt(after, variant), prompts, correct, n=job.eval.n, stage=after, variant=variant,
                     seed=job.seed, styles=styles)
    results = {f"pass@{k}": mean_pass_at_k(correct.tolist(), job.eval.n, k) for k in job.eval.k}
    results.update(num_prompts=len(correct), mean_reward=float(np.mean(table.column(schema.REWARD).to_numpy())),
                   verifier_errors=failures["errors"], verifier_timeouts=failures["timeouts"],
                   **{name: failures[name] for name in ENVIRONMENT_FAILURES if run.environment is not None},
                   **style_shares(styles, table.num_rows))
    results.update({column: float(np.mean(table.column(column).to_numpy()))  # the reward models' mean scores
                    for column in model_reward_columns(table.column_names)})
    results.update({key: failures[key] for key in model_reward_columns(failures)})  # and their counts
    run.metrics.truncate_after(eval_stage(after), variant, -1)  # an earlier attempt's row, if it got that far
    run.metrics.log(eval_stage(after), 0, results, variant=variant)
    log.info("eval %s-%s: %s", after, variant, ", ".join(f"pass@{k} {results[f'pass@{k}']:.3f}" for k in job.eval.k))
    return results
