"""Stage 2: PEAR-weighted SFT (level `none` is canonical SFT) of the student on the scored data.

Resumable: every `checkpoint_every` steps the learner saves model, optimizer, scheduler, RNG and the data
position; a rerun loads the latest checkpoint and continues the same batch order, so the optimizer steps and
samples seen equal an uninterrupted run's.

PEAR's frozen target (`sft.pear.target_mode: frozen`) is scored once per run, before the first variant that needs it,
into data/sft-ref.parquet (the data plus `ref_logprobs`), which every variant and every rerun then reads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from tqdm import tqdm

from pear_ray.actors.learner import LearnerGroup
from pear_ray.actors.roles import reference_pool
from pear_ray.actors.streaming import stream_parquet
from pear_ray.data import schema
from pear_ray.data.rows import read_rows
from pear_ray.data.tensors import to_tensors
from pear_ray.objectives import PearSft, pear_weights
from pear_ray.stages.common import Run, resume

log = logging.getLogger(__name__)
HISTOGRAM_ROWS = 256  # rows of the data whose PEAR weights under the trained model are plotted


def batch_plan(num_rows: int, batch_size: int, epochs: int, seed: int, min_rows: int) -> list[np.ndarray]:
    """Row indices of every step: a fresh seeded shuffle per epoch; a last batch smaller than `min_rows` (the
    learner's rank count) joins the one before it."""
    plan = []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(num_rows)
        batches = [order[start:start + batch_size] for start in range(0, num_rows, batch_size)]
        if len(batches) > 1 and len(batches[-1]) < min_rows:
            batches[-2:] = [np.concatenate(batches[-2:])]
        plan.extend(batches)
    return plan


def run_sft(run: Run, variant: str, data_path: Path) -> Path:
    """Train one SFT variant from the student; returns the exported Hugging Face folder."""
    job, sft = run.job, run.job.sft
    name = f"sft-{variant}"
    objective = job.sft_objective(variant)
    if objective.reads_frozen_target:
        data_path = frozen_targets(run, data_path)
    num_rows = pq.ParquetFile(data_path).metadata.num_rows
    plan = batch_plan(num_rows, sft.batch_size, sft.epochs, job.seed, job.resources.learner.num_ranks)
    learner = LearnerGroup.for_sft(run.student, job.resources.learner, sft, total_steps=len(plan), seed=job.seed)
    try:
        start = resume(run, learner, name, "sft", variant)
        learner.stream(data_path, plan[start:])
        samples = sum(len(rows) for rows in plan[:start])
        progress = tqdm(range(start, len(plan)), desc=name, initial=start, total=len(plan))
        for step in progress:
            stats = learner.streamed_step(objective)
            progress.set_postfix(loss=f"{stats['loss']:.3f}")
            samples += len(plan[step])
            run.metrics.log("sft", step + 1, {**stats, "samples_seen": samples}, variant=variant)
            if (step + 1) % sft.checkpoint_every == 0 and step + 1 < len(plan):
                learner.save_checkpoint(run.checkpoints(name), {"step": step + 1})
        if objective.weighted:
            probe = read_rows(data_path, np.arange(min(HISTOGRAM_ROWS, num_rows)))
            log_weight_histogram(run, learner, objective, probe, variant, len(plan))
        learner.export_hf(run.model(name))
    finally:
        learner.shutdown()
    return run.model(name)


def frozen_targets(run: Run, data_path: Path) -> Path:
    """The SFT data with PEAR's frozen target as `ref_logprobs`: the log-probs of the student before SFT (or of
    models.reference), scored by the reference actor once per run; a finished file is reused, never recomputed."""
    target = run.data("sft-ref")
    if target.is_file():  # the sink moves only a finished file into place
        return target
    model = run.reference(run.student)
    log.info("scoring PEAR's frozen target with %s into %s", model, target)
    pool = reference_pool(model, run.job.resources.reference)
    try:
        stream_parquet(pool, "score", data_path, target, column=schema.REF_LOGPROBS)
    finally:
        pool.shutdown()
    return target


def log_weight_histogram(run: Run, learner: LearnerGroup, objective: PearSft, table: pa.Table, variant: str,
                         step: int) -> None:
    """PEAR weights of some data rows at the end of SFT (online: under the trained model), for the weight-histogram
    plot."""
    if objective.target_mode == "online":  # the target is the trained model; a frozen one is in the data
        table = schema.append_column(table, schema.REF_LOGPROBS, ray.get(learner.logprobs(ray.put(table))))
    tensors = to_tensors(table, pad_id=0, columns=(schema.REF_LOGPROBS, schema.BEHAVIOR_LOGPROBS))
    weights = pear_weights(tensors[schema.REF_LOGPROBS], tensors[schema.BEHAVIOR_LOGPROBS],
                           tensors["response_mask"], **objective.weight_settings)
    run.metrics.histogram("sft", step, "pear_weights", weights[tensors["response_mask"]].to(torch.float32),
                          variant=variant)
