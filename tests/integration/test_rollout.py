"""Rollout/scoring actors (real vLLM CPU, and the transformers backend) and the reference actor in real Ray, and the pool's fault tolerance."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pear_ray.actors.pool import ActorPool
from pear_ray.actors.reference import ReferenceWorker
from pear_ray.actors.rollout import RolloutWorker
from pear_ray.config import load_job, parse_job
from pear_ray.data import schema
from pear_ray.data.io import encode_prompt, write_table
from pear_ray.driver.preflight import preflight
from pear_ray.models import resolve_model
from pear_ray.stages.common import Run
from pear_ray.stages.score import run_score, teacher_writes_data
from pear_ray.stages.sft import frozen_targets
from pear_ray.tracking import MetricsLogger

QUESTIONS = [f"What is {a} + {b}?" for a in range(4) for b in range(3)]


@pytest.fixture(scope="module")
def prompts(tiny_model_dir) -> pa.Table:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = [encode_prompt(tokenizer, q) for q in QUESTIONS]
    return pa.table({"id": [f"q{i}" for i in range(len(ids))], "prompt": QUESTIONS, "prompt_ids": ids})


def generate(actor, prompts, **kwargs):
    table, stats = actor.generate.remote(prompts, **kwargs)
    return ray.get(table), ray.get(stats)


def assert_hf_topk(model, row, k, temperature=1.0):
    """A row's teacher_topk is the top-k of log_softmax(logits / temperature) of a transformers forward pass."""
    prompt, response = row[schema.PROMPT_IDS], row[schema.RESPONSE_IDS]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1].double()
    logprobs, ids = torch.topk(torch.log_softmax(logits / temperature, dim=-1), k, dim=-1)
    topk = row[schema.TEACHER_TOPK]
    assert [[e["id"] for e in token] for token in topk] == ids.tolist()
    np.testing.assert_allclose([[e["logprob"] for e in token] for token in topk], logprobs.numpy(), atol=1e-4)


def test_generate_gives_n_samples_per_prompt_with_groups_and_versions(rollout, prompts):
    out, stats = generate(rollout, prompts, n=3, seed=7, max_tokens=8, temperature=1.0)
    assert out.num_rows == stats["rows"] == 3 * prompts.num_rows
    assert out.column("group_id").to_pylist() == list(np.repeat(np.arange(prompts.num_rows), 3))
    assert out.column("id").to_pylist()[:4] == ["q0/0", "q0/1", "q0/2", "q1/0"]
    assert out.column("prompt").to_pylist()[3] == QUESTIONS[1]  # prompt columns travel with the samples
    assert set(out.column("finish_reason").to_pylist()) <= {"stop", "length"}
    assert set(out.column("policy_version").to_pylist()) == {0}
    schema.validate(out, required=(schema.RESPONSE_IDS, schema.ROLLOUT_LOGPROBS))  # lengths agree, log-probs valid
    again, _ = generate(rollout, prompts, n=3, seed=7, max_tokens=8, temperature=1.0)
    assert again.column("response_ids").equals(out.column("response_ids"))  # seeded


def test_generated_scored_and_reference_logprobs_agree(ray_cluster, rollout, prompts, tiny_model_dir):
    generated, _ = generate(rollout, prompts, n=2, seed=1, max_tokens=12)
    scored_ref, _ = rollout.score.remote(generated, column=schema.BEHAVIOR_LOGPROBS)
    reference = ray.remote(ReferenceWorker).options(num_cpus=0.25).remote(tiny_model_dir)
    referenced, _ = reference.score.remote(scored_ref, column=schema.REF_LOGPROBS)  # passed actor to actor
    table = ray.get(referenced)
    ray.kill(reference)
    sampled = np.concatenate(table.column(schema.ROLLOUT_LOGPROBS).to_pylist())
    scored = np.concatenate(table.column(schema.BEHAVIOR_LOGPROBS).to_pylist())
    ref = np.concatenate(table.column(schema.REF_LOGPROBS).to_pylist())
    assert len(sampled) == schema.response_token_count(table) > prompts.num_rows
    np.testing.assert_allclose(scored, sampled, atol=1e-4)
    np.testing.assert_allclose(ref, scored, atol=1e-4)


def test_topk_adds_teacher_topk_and_changes_nothing_else(rollout, prompts):
    plain, _ = generate(rollout, prompts, n=2, seed=9, max_tokens=6)
    out, _ = generate(rollout, prompts, n=2, seed=9, max_tokens=6, topk=4)
    assert schema.TEACHER_TOPK not in plain.column_names
    assert out.drop_columns([schema.TEACHER_TOPK]).equals(plain)
    schema.validate(out, vocab_size=384)  # one entry list per response token, valid ids and log-probs
    for topk, logprobs in zip(*(out.column(c).to_pylist() for c in (schema.TEACHER_TOPK, schema.ROLLOUT_LOGPROBS))):
        assert all(len(token) == 4 and token[0]["logprob"] >= lp - 1e-6 for token, lp in zip(topk, logprobs))
    scored, _ = rollout.score.remote(plain, topk=4)  # teacher-forced at temperature 1, as sampled
    only_topk, _ = rollout.score.remote(plain, column=None, topk=4)  # for data whose behaviour log-probs are given
    scored, only_topk = ray.get([scored, only_topk])
    assert only_topk.column_names == [*plain.column_names, schema.TEACHER_TOPK]
    def entries(table, field):
        return [[[e[field] for e in token] for token in row] for row in table.column(schema.TEACHER_TOPK).to_pylist()]

    for table in (scored, only_topk):  # the distribution sampled from at temperature 1 is the one scored
        assert entries(table, "id") == entries(out, "id")
        np.testing.assert_allclose(np.concatenate(sum(entries(table, "logprob"), [])),
                                   np.concatenate(sum(entries(out, "logprob"), [])), atol=1e-4)


def test_teacher_data_carries_the_log_probs_it_was_sampled_with(ray_cluster, tmp_path):
    """The behaviour model writing SFT data at temperature 0.7: the behaviour log-probs are log_softmax(logits / 0.7)
    of that model, teacher-forced by plain transformers, not the raw model's (what PEAR's weights divide by); so is
    the teacher top-k it records (k above vLLM's default cap of 20 log-probs, which the stage raises)."""
    smoke = Path(__file__).resolve().parents[2] / "jobs" / "smoke.yaml"
    job = load_job(smoke, ["sampling.temperature=0.7", "sampling.max_tokens=6", "task.num_train=4",
                           "score.teacher_sft_steps=0", "score.teacher_topk=24"])
    student = resolve_model(job.models.student, tmp_path / "student")  # the tokenizer; the behaviour model writes
    with MetricsLogger(tmp_path, resume=False, loggers=()) as metrics:
        run = Run(job, tmp_path, metrics, student)
        data = pq.read_table(teacher_writes_data(run, run.data("sft")))
    assert data.num_rows == 4
    behavior = AutoModelForCausalLM.from_pretrained(run.model("behavior"), dtype=torch.float32).eval()
    for row in data.to_pylist():
        prompt, response = row[schema.PROMPT_IDS], row[schema.RESPONSE_IDS]
        with torch.no_grad():
            logits = behavior(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1].double()
        expected = torch.log_softmax(logits / 0.7, dim=-1).gather(1, torch.tensor(response)[:, None])[:, 0]
        assert np.abs(np.array(row[schema.BEHAVIOR_LOGPROBS]) - expected.numpy()).max() < 1e-4
        assert_hf_topk(behavior, row, 24, temperature=0.7)
    schema.validate(data, vocab_size=behavior.config.vocab_size)


def test_given_data_is_scored_for_the_topk_it_lacks(ray_cluster, tiny_model_dir, tmp_path):
    """Data with behaviour log-probs but no top-k: the behaviour model adds the top-k and leaves the log-probs as
    given; without a behaviour model that is refused before anything starts (preflight), naming what to give."""
    rng = np.random.default_rng(0)
    rows = [{"prompt_ids": rng.integers(3, 384, 4).tolist(), "response_ids": rng.integers(3, 384, n).tolist(),
             "behavior_logprobs": rng.uniform(-8.0, -4.0, n).tolist()} for n in (3, 7, 1)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    job = {"name": "given", "data": {"sft": str(tmp_path / "sft.jsonl")}, "score": {"teacher_topk": 4},
           "models": {"student": {"path": str(tiny_model_dir)}}, "resources": {"rollout": {"num_cpus": 0.25}}}
    with pytest.raises(ValueError, match="has behaviour log-probs but no teacher_topk column: give models.behavior"):
        preflight(parse_job(job), None)
    job["models"]["behavior"] = {"path": str(tiny_model_dir)}
    data = pq.read_table(run_score(Run(parse_job(job), tmp_path / "run", metrics=None, student=tiny_model_dir)))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for row, given in zip(data.to_pylist(), rows):
        np.testing.assert_allclose(row[schema.BEHAVIOR_LOGPROBS], given["behavior_logprobs"], rtol=1e-6)
        assert_hf_topk(model, row, 4)


def test_teacher_topk_on_the_transformers_backend(ray_cluster, tiny_model_dir, tmp_path):
    """score.teacher_topk with the transformers backend, which has no cap on top-k (vLLM's max_logprobs is not its
    option): given data scored through the score stage gets the behaviour model's log-probs and top-k, k above
    vLLM's default cap of 20."""
    rng = np.random.default_rng(1)
    rows = [{"prompt_ids": rng.integers(3, 384, 5).tolist(), "response_ids": rng.integers(3, 384, n).tolist()}
            for n in (4, 1, 6)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    job = parse_job({"name": "topk", "data": {"sft": str(tmp_path / "sft.jsonl")}, "score": {"teacher_topk": 24},
                     "models": {"student": {"path": str(tiny_model_dir)}, "behavior": {"path": str(tiny_model_dir)}},
                     "resources": {"rollout": {"num_cpus": 0.25, "engine": {"backend": "transformers"}}}})
    data = pq.read_table(run_score(Run(job, tmp_path / "run", metrics=None, student=tiny_model_dir)))
    assert data.column(schema.PROMPT_IDS).to_pylist() == [row["prompt_ids"] for row in rows]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for row in data.to_pylist():
        prompt, response = row[schema.PROMPT_IDS], row[schema.RESPONSE_IDS]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1].double()
        expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(response)[:, None])[:, 0]
        np.testing.assert_allclose(row[schema.BEHAVIOR_LOGPROBS], expected.numpy(), atol=1e-4)
        assert_hf_topk(model, row, 24)


@pytest.mark.parametrize("rollout", ["vllm"], indirect=True)  # the rollout actor only makes the data here
def test_frozen_targets_are_the_students_and_scored_once(ray_cluster, rollout, prompts, tiny_model_dir, tmp_path):
    """Without models.reference, PEAR's frozen target is the student before SFT; the file is written once."""
    job = parse_job({"name": "frozen", "models": {"student": {"path": str(tiny_model_dir)}},
                     "sft": {"pear": {"target_mode": "frozen"}}, "resources": {"reference": {"num_cpus": 0.25}}})
    run = Run(job, tmp_path, metrics=None, student=tiny_model_dir)
    generated, _ = generate(rollout, prompts, n=1, seed=5, max_tokens=6)  # the student's samples at temperature 1
    write_table(generated, run.data("sft"))
    path = frozen_targets(run, run.data("sft"))
    scored = pq.read_table(path)
    assert path == run.data("sft-ref") and scored.column("id").equals(generated.column("id"))
    np.testing.assert_allclose(np.concatenate(scored.column(schema.REF_LOGPROBS).to_pylist()),
                               np.concatenate(generated.column(schema.ROLLOUT_LOGPROBS).to_pylist()), atol=1e-4)
    written = path.stat().st_mtime_ns
    assert frozen_targets(run, run.data("sft")) == path and path.stat().st_mtime_ns == written  # not recomputed


def test_bad_model_folder_is_a_clear_error(ray_cluster, tmp_path):
    actor = ray.remote(RolloutWorker).options(num_cpus=0.25).remote(tmp_path / "missing")
    with pytest.raises(Exception, match="model folder .*missing: the folder does not exist"):
        ray.get(actor.health.remote())


@pytest.mark.slow  # about 20 s; test_lost_actors replaces a dead actor and reruns its batch by default
def test_a_killed_rollout_actor_loses_and_duplicates_nothing(ray_cluster, prompts, tiny_model_dir):
    def make_actor(slot):
        return ray.remote(RolloutWorker).options(num_cpus=0.25).remote(tiny_model_dir, seed=slot)

    pool = ActorPool.start(make_actor, size=2, max_in_flight=2)
    batches = [prompts.slice(i, 2) for i in range(0, prompts.num_rows, 2)] * 2  # 12 batches
    refs = [ray.put(b) for b in batches]
    seen, killed = [], False
    for index, batch_ref, _ in pool.map("generate", refs, n=2, max_tokens=4, seed=0):
        seen.append(index)
        out = ray.get(batch_ref)
        assert out.column("id").to_pylist() == [f"{i}/{j}" for i in batches[index].column("id").to_pylist()
                                                 for j in range(2)]
        if not killed:
            ray.kill(pool.slots[0].actor)  # mid-stream: it has work queued
            killed = True
    pool.shutdown()
    assert sorted(seen) == list(range(len(batches)))  # every batch exactly once
    assert pool.stats.actors_replaced >= 1
    assert pool.stats.resubmitted >= 1


@pytest.mark.parametrize("rollout", ["vllm"], indirect=True)  # the pool's streaming, whatever the backend
def test_streaming_a_parquet_dataset_keeps_order_and_every_row(ray_cluster, rollout, prompts, tmp_path):
    import pyarrow.parquet as pq

    from pear_ray.actors.streaming import stream_parquet

    generated, _ = generate(rollout, prompts, n=2, seed=3, max_tokens=6)
    source, target = tmp_path / "in.parquet", tmp_path / "out" / "scored.parquet"
    pq.write_table(generated.drop_columns([schema.ROLLOUT_LOGPROBS]), source, row_group_size=5)  # 5 row groups
    pool = ActorPool.start(lambda slot: rollout, size=1, max_in_flight=2)  # reuse the module's actor
    totals = stream_parquet(pool, "score", source, target, column=schema.BEHAVIOR_LOGPROBS)
    scored = pq.read_table(target)
    assert totals["batches"] == 5 and totals["rows"] == scored.num_rows == generated.num_rows
    assert scored.column("id").to_pylist() == generated.column("id").to_pylist()
    np.testing.assert_allclose(np.concatenate(scored.column(schema.BEHAVIOR_LOGPROBS).to_pylist()),
                               np.concatenate(generated.column(schema.ROLLOUT_LOGPROBS).to_pylist()), atol=1e-4)
    assert not (tmp_path / "out" / "scored.parquet.partial").exists()


def test_prompts_of_one_call_do_not_share_random_draws(rollout, prompts):
    same_prompt = pa.table({"prompt_ids": [prompts.column("prompt_ids")[0].as_py()] * 3, "group_id": [4, 5, 4]})
    out, _ = generate(rollout, same_prompt, n=1, seed=11, max_tokens=8)
    responses = out.column("response_ids").to_pylist()
    assert responses[0] == responses[2]  # the same group (prompt) and seed: the same draws
    assert responses[0] != responses[1]  # another prompt in the call: its own seed
