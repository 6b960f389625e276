"""The teacher: the behaviour model after a brief canonical SFT (score.teacher_sft_steps), before it writes the SFT
data, so that data is competent and off the student's distribution, as a stronger teacher's would be."""

from __future__ import annotations

from pathlib import Path

from pear_ray.data import schema
from pear_ray.data.io import encode_response, load_sft_data
from pear_ray.stages.common import Run, is_exported, prompt_table
from pear_ray.stages.sft import sft_on_rows


def train_teacher(run: Run, base: Path) -> Path:
    """`base` after score.teacher_sft_steps of canonical SFT on the task's gold answers, or on the response texts of
    `score.teacher_data` (traces in a style of their own); exported to run.teacher_dir once."""
    out = run.teacher_dir
    if is_exported(out):
        return out
    job = run.job
    if job.score.teacher_data is not None:
        rows = load_sft_data(job.score.teacher_data, run.tokenizer, max_prompt_tokens=job.data.max_prompt_tokens,
                             max_response_tokens=job.data.max_response_tokens)
    else:
        prompts = prompt_table(run, "train")
        rows = schema.append_column(prompts, schema.RESPONSE_IDS, [
            encode_response(run.tokenizer, answer) for answer in prompts.column(schema.ANSWER).to_pylist()])
    return sft_on_rows(run, base, rows, out, steps=job.score.teacher_sft_steps, optimizer=job.score.teacher_optimizer,
                       batch_size=job.sft.batch_size, seed=job.seed + 1, stage="teacher_sft")
