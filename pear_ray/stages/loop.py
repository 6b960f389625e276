"""The one training loop: every model a job trains (the student's prior, the teacher, each SFT variant, each RL
variant) goes through `train`, which owns resume, step, log, checkpoint and export.

    learner  <- the start model, this training's optimizer
    start    <- the last whole checkpoint's step (0 when none); metrics logged after it are dropped
    for step in start..steps-1:
        batch, figures <- source.batch(step)          rows of a file, a table, or RL's rollouts
        learner.step(batch, objective)                unless the source has nothing to train this step
        figures += source.after_update(step)          RL: the new weights go to the rollout service
        log figures; checkpoint every `checkpoint_every` steps
        a node of the learner is draining: checkpoint (if its deadline allows), raise LearnerPreempted
    export the model to a Hugging Face folder

What differs between trainings is where the batches come from, a `BatchSource`; the loop never looks inside one.
Resume is exact because every source makes step t's batch from (seed, t) alone and the checkpoint restores the
learner's weights, optimizer, schedule and RNG.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import ray
from tqdm import tqdm

from pear_ray.actors.learner import LearnerGroup, LearnerPreempted
from pear_ray.config import LoraConfig, OptimizerConfig
from pear_ray.objectives import ObjectiveConfig
from pear_ray.stages.common import Run, checkpoint, resume

Batch = ray.ObjectRef | str  # an Arrow table's ref, or actors.learner.STREAMED


class BatchSource(Protocol):
    """Where a training's batches come from."""

    def start(self, learner: LearnerGroup, step: int) -> None:
        """Get ready to give batches from `step` on (0, or the step the learner's checkpoint resumed at)."""

    def batch(self, step: int) -> tuple[Batch | None, dict]:
        """Step `step`'s batch (None: nothing to train on this step) and the figures to log with it."""

    def after_update(self, step: int, figures: dict) -> dict:
        """What follows the learner's update (or the lack of one) before the step is logged, given the step's figures
        so far; more figures."""

    def close(self) -> None:
        """Free what the source started (actors, streams), whatever happened."""


@dataclass
class Training:
    """One model trained from `model` for `steps` steps, checkpointed under checkpoints/<name>, logged as `stage`
    (and `variant`), exported to `export`."""

    name: str
    stage: str
    variant: str | None
    model: Path
    export: Path
    objective: ObjectiveConfig
    optimizer: OptimizerConfig
    steps: int
    checkpoint_every: int
    seed: int
    temperature: float = 1.0  # the rollouts' sampling temperature, for on-policy objectives (RL)
    lora: LoraConfig | None = None  # adapters on the frozen model (models.student.lora), else every weight trains


def train(run: Run, training: Training, source: BatchSource,
          before_export: Callable[[LearnerGroup], None] | None = None) -> Path:
    """Run `training` on the batches of `source`; returns the exported folder. `before_export` sees the trained
    learner last (SFT plots its PEAR weights)."""
    learner = LearnerGroup(run.shared(training.model), run.job.resources.learner, lora=training.lora,
                           **training.optimizer.model_dump(), total_steps=training.steps, seed=training.seed,
                           temperature=training.temperature)
    try:
        start = resume(run, learner, training.name, training.stage, training.variant)
        source.start(learner, start)
        progress = tqdm(range(start, training.steps), desc=training.name.replace("_", " "), initial=start,
                        total=training.steps)
        for step in progress:
            batch, figures = source.batch(step)
            if batch is not None:
                training_started = time.perf_counter()
                update = learner.step(batch, training.objective)
                figures.update(update, train_seconds=time.perf_counter() - training_started)
                figures["learner_step"] = figures.pop("step")  # optimizer updates so far; `step` is this loop's
            figures.update(source.after_update(step, figures))
            shown = "reward" if "reward" in figures else "loss"
            if shown in figures:
                progress.set_postfix({shown: f"{figures[shown]:.3f}"})
            run.metrics.log(training.stage, step + 1, figures, variant=training.variant)
            if notice := learner.notice():  # a node of the ranks drains: the driver starts the stage again elsewhere,
                if notice.checkpoint:  # from here if the deadline leaves time, else from the last checkpoint
                    learner.save_checkpoint(run.checkpoints(training.name), {"step": step + 1})
                raise LearnerPreempted(notice, step + 1)
            if (step + 1) % training.checkpoint_every == 0 and step + 1 < training.steps:
                checkpoint(run, learner, training.name, step + 1)
        if before_export is not None:
            before_export(learner)
        learner.export_hf(run.folder.where(training.export))  # rank 0 writes it on its node (and uploads it)
        run.fetched(training.export)
    finally:
        source.close()
        learner.shutdown()
    return training.export

