"""The smallest real pipeline, run by `pear-ray demo` until the full job runner lands (end-to-end issue):
a tiny teacher writes answers with vLLM (behaviour log-probs recorded as it samples), a tiny student takes
PEAR-weighted SFT steps on them in the DeepSpeed learner, and the rollout service picks up the new weights."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import ray
from tqdm import tqdm
from transformers import AutoTokenizer

from pear_ray.actors.learner import LearnerGroup
from pear_ray.actors.runtime import init_ray
from pear_ray.config import JobConfig, dump_job
from pear_ray.data import schema
from pear_ray.data.io import encode_prompt, write_table
from pear_ray.driver.roles import probe_batch, resolve_model, rollout_pool, sync_weights
from pear_ray.tasks import make_task
from pear_ray.tracking import MetricsLogger, plot_run

log = logging.getLogger(__name__)


def task_prompts(job: JobConfig, tokenizer) -> pa.Table:
    """The job's training prompts (disjoint from its eval prompts), tokenized as every stage does."""
    prompts = make_task(job.task, job.data, seed=job.seed).prompts("train")
    ids = [encode_prompt(tokenizer, text) for text in prompts.column(schema.PROMPT).to_pylist()]
    return schema.append_column(prompts, schema.PROMPT_IDS, ids)


def run_preview(job: JobConfig, run_dir: Path) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_job(job, run_dir / "config.yaml")
    init_ray()
    student = resolve_model(job.models.student, run_dir / "models" / "student")
    teacher = resolve_model(job.models.behavior or job.models.student, run_dir / "models" / "teacher")
    prompts = task_prompts(job, AutoTokenizer.from_pretrained(student))

    log.info("teacher writes %d answers", prompts.num_rows)
    teachers = rollout_pool(teacher, job.resources.rollout, seed=job.seed)
    batches = batches_of(prompts, job.sft.batch_size)
    sampling = job.sampling.model_dump()
    generated = dict((i, ref) for i, ref, _ in teachers.map("generate", batches, n=1, seed=job.seed, **sampling))
    teachers.shutdown()
    data = pa.concat_tables(ray.get([generated[i] for i in range(len(batches))]))
    data = schema.append_column(data, schema.BEHAVIOR_LOGPROBS, data.column(schema.ROLLOUT_LOGPROBS))
    write_table(data, run_dir / "data" / "sft.parquet")

    sft_batches = batches_of(data, job.sft.batch_size)
    learner = LearnerGroup.for_sft(student, job.resources.learner, job.sft, total_steps=len(sft_batches), seed=job.seed)
    students = rollout_pool(student, job.resources.rollout, seed=job.seed)
    variant = job.sft.pear.level
    try:
        with MetricsLogger(run_dir, resume=False) as metrics:
            for step, batch in enumerate(tqdm(sft_batches, desc=f"PEAR-SFT ({variant})"), start=1):
                stats = learner.sft_step(batch)
                metrics.log("sft", step, stats, variant=variant)
            students.call_all("health")  # started beside the learner; wait here so the sync time is the sync's
            synced = sync_weights(learner, students, version=step, probe_ref=probe_batch(data))
            metrics.log("sync", step, synced, variant=variant)
        learner.export_hf(run_dir / "models" / "sft")
    finally:
        learner.shutdown()
        students.shutdown()
    plot_run(run_dir)
    return {**stats, **synced}


def batches_of(table: pa.Table, size: int) -> list[ray.ObjectRef]:
    """The table cut into consecutive batches, each put in the object store once."""
    return [ray.put(table.slice(start, size)) for start in range(0, table.num_rows, size)]
