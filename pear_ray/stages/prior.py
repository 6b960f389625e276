"""Stage 0, for tiny students only: the prior. A freshly built tiny model knows nothing; pre-training gives a real
model its habits (fluent text, formats). So a tiny student with `models.student.prior` first gets canonical SFT on a
scripted policy's responses to prompts that follow the train split (disjoint from train and eval)."""

from __future__ import annotations

from pathlib import Path

from pear_ray.config import JobConfig
from pear_ray.stages.common import Run, is_exported, prompt_table
from pear_ray.stages.sft import sft_on_rows
from pear_ray.tasks.addition import scripted_rows

PRIOR_SEED_OFFSET = 2  # the prior's draws stay apart from the score stage's, which the job's seed itself seeds


def prior_seed(job: JobConfig) -> int:
    """Whose prior the job's student gets: models.student.prior.seed when set (one prior for every seed of an
    experiment), else the job's own seed."""
    shared = job.models.student.prior.seed
    return job.seed if shared is None else shared


def train_prior(run: Run, base: Path, out: Path | None = None) -> Path:
    """`base` after its prior, exported to `out` (default models/student-prior) once."""
    job, prior = run.job, run.job.models.student.prior
    out = out or run.model("student-prior")
    if is_exported(out):
        return out
    seed = prior_seed(job) + PRIOR_SEED_OFFSET
    prompts = prompt_table(run, "train", job.task.num_train + prior.num_prompts).slice(job.task.num_train)
    rows = scripted_rows(prompts, run.tokenizer, prior.policy, seed=seed)
    return sft_on_rows(run, base, rows, out, steps=prior.steps, optimizer=prior.optimizer,
                       batch_size=prior.batch_size, seed=seed, stage="prior_sft")
