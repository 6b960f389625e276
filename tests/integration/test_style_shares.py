"""Response styles in a run: eval's per-prompt style counts and share metrics, and RL's share per step, on a tiny
student taught to open its answers either way (a worked trace, a bare answer, or now and then neither)."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from support.rl import run_rl, samples
from transformers import AutoModelForCausalLM, AutoTokenizer

from pear_ray.config import ScriptedPolicy, parse_job
from pear_ray.data import schema
from pear_ray.data.io import encode_prompt
from pear_ray.stages.common import Run
from pear_ray.stages.evaluate import run_eval
from pear_ray.tasks.addition import AdditionTask, response_style, scripted_rows
from pear_ray.tracking import MetricsLogger, read_metrics, results_from_metrics, write_report

TEACHING_STEPS = 60  # enough for the tiny model to open with either style most of the time


@pytest.fixture(scope="module")
def two_style_student(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model after full-batch steps of plain torch SFT on the two-style policy's 1-digit sums."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = scripted_rows(AdditionTask(digits=1, num_train=32).prompts("train"), tokenizer, ScriptedPolicy(p_trace=0.5),
                         seed=0, samples_per_prompt=2)
    texts = [(encode_prompt(tokenizer, prompt), response) for prompt, response in
             zip(rows.column(schema.PROMPT).to_pylist(), rows.column(schema.RESPONSE_IDS).to_pylist())]
    width = max(len(prompt) + len(response) for prompt, response in texts)
    ids = torch.full((len(texts), width), tokenizer.eos_token_id)
    labels, mask = torch.full_like(ids, -100), torch.zeros_like(ids)
    for i, (prompt, response) in enumerate(texts):
        ids[i, :len(prompt) + len(response)] = torch.tensor(prompt + response)
        labels[i, len(prompt):len(prompt) + len(response)] = torch.tensor(response)
        mask[i, :len(prompt) + len(response)] = 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(TEACHING_STEPS):
        optimizer.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
    out = tmp_path_factory.mktemp("two_style_student")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def decoded_styles(table: pa.Table, model: Path) -> list[str | None]:
    """Each saved sample's style, from its response ids decoded as the stages decode them."""
    texts = AutoTokenizer.from_pretrained(model).batch_decode(table.column(schema.RESPONSE_IDS).to_pylist(),
                                                               skip_special_tokens=True)
    return [response_style(text) for text in texts]


def test_eval_counts_each_prompts_samples_per_style_and_logs_the_shares(ray_cluster, two_style_student, tmp_path):
    job = parse_job({
        "name": "styles", "loggers": [], "models": {"student": {"path": str(two_style_student)}},
        "task": {"kind": "addition", "args": {"digits": 1}, "num_train": 32, "num_eval": 8},
        "sampling": {"temperature": 1.0, "max_tokens": 12}, "eval": {"n": 4, "k": [1, 4]},
        "resources": {"rollout": {"num_actors": 1, "num_cpus": 0.5, "engine": {"backend": "transformers"}}},
    })
    with MetricsLogger(tmp_path, resume=False, loggers=()) as metrics:
        run_eval(Run(job, tmp_path, metrics, two_style_student), "none", two_style_student, "sft")
    table = pq.read_table(tmp_path / "eval" / "sft-none.parquet")
    assert table.schema.field("style_trace").type == pa.int32() == table.schema.field("style_bare").type
    trace, bare = table.column("style_trace").to_numpy(), table.column("style_bare").to_numpy()
    assert ((trace + bare) <= table.column("n").to_numpy()).all()
    [logged] = [r for r in read_metrics(tmp_path) if r["stage"] == "eval_sft"]
    samples_in_all = table.column("n").to_numpy().sum()
    assert logged["share_trace"] == trace.sum() / samples_in_all and logged["share_bare"] == bare.sum() / samples_in_all
    assert 0 < logged["share_trace"] and 0 < logged["share_bare"]  # the student writes both
    report = write_report(tmp_path, results_from_metrics(read_metrics(tmp_path)), seed=0, job_name="styles")
    assert f"| {logged['share_trace']:.3f} | – |" in report.read_text()  # trace share after SFT, no RL


def test_each_rl_step_logs_the_share_of_every_sample_it_generated(ray_cluster, two_style_student, tmp_path):
    """fill_batch draws more prompts in some steps: the share counts their samples too (the saved rollouts hold
    every sample of the step); the length reward is a custom one, which keeps the addition task's styles."""
    rows, _ = run_rl(tmp_path, two_style_student, steps=2, fill_batch=True, fill_max_extra_prompts=4,
                     rollout={"engine": {"backend": "transformers"}})
    assert any(row["extra_prompts"] for row in rows)
    for row in rows:
        styles = decoded_styles(samples(tmp_path, row["step"]), two_style_student)
        assert row["samples"] == len(styles)
        assert row["share_trace"] == styles.count("trace") / len(styles)
        assert row["share_bare"] == styles.count("bare") / len(styles)
    assert sum(r["share_trace"] for r in rows) > 0 and sum(r["share_bare"] for r in rows) > 0
