"""Stage 2: PEAR-weighted SFT (level `none` is canonical SFT) of the student on the scored data, streamed from its
Parquet file; and canonical SFT on a table the driver holds (`sft_on_rows`: the student's prior, the teacher).

Both go through the one training loop (stages/loop.py). Resumable: every `checkpoint_every` steps the learner saves
model, optimizer, scheduler, RNG and the step; the batch plan is a function of the seed, so a rerun continues the
same batch order and the optimizer steps and samples seen equal an uninterrupted run's.

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

from pear_ray.actors.learner import STREAMED, LearnerGroup
from pear_ray.actors.roles import reference_pool
from pear_ray.actors.streaming import stream_parquet
from pear_ray.config import OptimizerConfig
from pear_ray.data import schema
from pear_ray.data.rows import read_rows
from pear_ray.data.tensors import to_tensors
from pear_ray.objectives import PearSft, pear_weights
from pear_ray.stages.common import Run
from pear_ray.stages.loop import Training, train

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
    objective = job.sft_objective(variant)
    if objective.reads_frozen_target:
        data_path = frozen_targets(run, data_path)
    num_rows = pq.ParquetFile(data_path).metadata.num_rows
    plan = batch_plan(num_rows, sft.batch_size, sft.epochs, job.seed, job.resources.learner.num_ranks)
    training = Training(name=f"sft-{variant}", stage="sft", variant=variant, model=run.student,
                        export=run.model(f"sft-{variant}"), objective=objective, optimizer=sft.optimizer,
                        steps=len(plan), checkpoint_every=sft.checkpoint_every, seed=job.seed,
                        lora=job.models.student.lora)

    def plot_weights(learner: LearnerGroup) -> None:
        if objective.weighted:
            probe = read_rows(data_path, np.arange(min(HISTOGRAM_ROWS, num_rows)))
            log_weight_histogram(run, learner, objective, probe, variant, len(plan))

    return train(run, training, StreamedRows(run.shared(data_path), plan), before_export=plot_weights)


def sft_on_rows(run: Run, base: Path, rows: pa.Table, out: Path, *, steps: int, optimizer: OptimizerConfig,
                batch_size: int, seed: int, stage: str) -> Path:
    """`steps` of canonical SFT of `base` on random batches of `rows` (a table the driver holds: the prior's and the
    teacher's few thousand rows), exported to `out`; checkpointed every sft.checkpoint_every steps under
    checkpoints/<stage> and resumable like any training."""
    rng = np.random.default_rng(seed)
    plan = [rng.choice(rows.num_rows, size=min(batch_size, rows.num_rows), replace=False) for _ in range(steps)]
    training = Training(name=stage, stage=stage, variant=None, model=base, export=out,
                        objective=PearSft(level="none"), optimizer=optimizer, steps=steps,
                        checkpoint_every=run.job.sft.checkpoint_every, seed=seed)
    return train(run, training, TableRows(rows, plan))


class StreamedRows:
    """SFT batches streamed from a Parquet file to the learner ranks (each its shard, through Ray Data), in a seeded
    plan of row indices per step; counts the samples seen."""

    def __init__(self, path: str, plan: list[np.ndarray]):
        self.path, self.plan = path, plan

    def start(self, learner: LearnerGroup, step: int) -> None:
        learner.stream(self.path, self.plan[step:])
        self.samples = sum(len(rows) for rows in self.plan[:step])

    def batch(self, step: int) -> tuple[str, dict]:
        self.samples += len(self.plan[step])
        return STREAMED, {}

    def after_update(self, step: int, figures: dict) -> dict:
        return {"samples_seen": self.samples}

    def close(self) -> None:
        pass


class TableRows:
    """Batches of a table the driver holds, each step's rows given by a seeded plan."""

    def __init__(self, rows: pa.Table, plan: list[np.ndarray]):
        self.rows, self.plan = rows, plan

    def start(self, learner: LearnerGroup, step: int) -> None:
        pass

    def batch(self, step: int) -> tuple[ray.ObjectRef, dict]:
        return ray.put(self.rows.take(self.plan[step])), {}

    def after_update(self, step: int, figures: dict) -> dict:
        return {}

    def close(self) -> None:
        pass


def frozen_targets(run: Run, data_path: Path) -> Path:
    """The SFT data with PEAR's frozen target as `ref_logprobs`: the log-probs of the student before SFT (or of
    models.reference), scored by the reference actor once per run; a finished file is reused, never recomputed."""
    target = run.data("sft-ref")
    if run.fetched(target).is_file():  # the sink moves only a finished file into place
        return target
    model = run.reference(run.student)
    log.info("scoring PEAR's frozen target with %s into %s", model, target)
    pool = reference_pool(run.shared(model), run.job.resources.reference)
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
