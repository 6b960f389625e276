"""The roles together in real Ray: vLLM rollout pool, DeepSpeed learner group and weight sync, started from
the same job file with only the resource counts changed."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray
from support.learner import as_multi_turn
from transformers import AutoTokenizer

from pear_ray.actors.learner import LearnerGroup
from pear_ray.actors.roles import mismatch, probe_batch, reference_actor, rollout_pool, sync_weights
from pear_ray.config import load_job
from pear_ray.data import schema
from pear_ray.data.io import encode_prompt
from pear_ray.models import resolve_model
from pear_ray.objectives import Grpo, PearSft

SMOKE = Path(__file__).resolve().parents[2] / "jobs" / "smoke.yaml"


def flat(column) -> np.ndarray:
    return np.concatenate(column.to_pylist())


@pytest.mark.parametrize(("rollout_actors", "learner_ranks"), [pytest.param(2, 1, marks=pytest.mark.slow), (1, 2)])
def test_generate_train_sync_roundtrip(ray_cluster, tmp_path_factory, rollout_actors, learner_ranks):
    job = load_job(SMOKE, [f"resources.rollout.num_actors={rollout_actors}",
                           f"resources.learner.num_ranks={learner_ranks}", "sft.optimizer.lr=0.01"])
    student = resolve_model(job.models.student, tmp_path_factory.mktemp("student"))
    tokenizer = AutoTokenizer.from_pretrained(student)
    questions = [f"Calculate {a} + {b}." for a in range(4) for b in range(2)]
    prompts = pa.table({"id": [str(i) for i in range(len(questions))],
                        "prompt_ids": [encode_prompt(tokenizer, q) for q in questions]})
    pool = rollout_pool(student, job.resources.rollout, seed=job.seed)
    learner = LearnerGroup(student, job.resources.learner, **job.sft.optimizer.model_dump(), total_steps=4, seed=job.seed)
    try:
        halves = [ray.put(prompts.slice(0, 4)), ray.put(prompts.slice(4))]
        results = {index: ref for index, ref, _ in pool.map("generate", halves, n=2, seed=0, max_tokens=8)}
        assert set(results) == {0, 1}
        if rollout_actors == 2:
            assert len(pool.stats.per_actor_completed) == 2  # both actors got work
        batch = pa.concat_tables([ray.get(results[0]), ray.get(results[1])])
        batch = schema.append_column(batch, schema.BEHAVIOR_LOGPROBS, batch.column(schema.ROLLOUT_LOGPROBS))
        batch_ref = ray.put(batch)

        # generated, teacher-forced and learner log-probs of the same ids agree (fp32)
        scored, _ = pool.actors[0].score.remote(batch_ref, column=schema.REF_LOGPROBS)
        learner_logp = flat(ray.get(learner.logprobs(batch_ref)))
        np.testing.assert_allclose(flat(ray.get(scored).column(schema.REF_LOGPROBS)), flat(batch.column(
            schema.ROLLOUT_LOGPROBS)), atol=1e-4)
        np.testing.assert_allclose(learner_logp, flat(batch.column(schema.ROLLOUT_LOGPROBS)), atol=1e-4)

        probe = probe_batch(batch)
        before_step = mismatch(learner, pool, probe)
        assert before_step["mismatch_max"] < 1e-4
        stats = learner.step(batch_ref, PearSft(level="token"))
        assert np.isfinite(stats["loss"])
        stale = mismatch(learner, pool, probe)
        assert stale["mismatch_max"] > 1e-3  # the learner moved, the rollout service has not yet
        synced = sync_weights(learner, pool, version=1, probe_ref=probe)
        assert synced["mismatch_max"] < 1e-4
        again, _ = pool.actors[-1].generate.remote(halves[0], n=1, max_tokens=4)
        assert set(ray.get(again).column(schema.POLICY_VERSION).to_pylist()) == {1}
    finally:
        learner.shutdown()
        pool.shutdown()


def test_rl_log_probs_are_at_the_sampling_temperature(ray_cluster, tmp_path_factory):
    """At temperature 0.7 the rollout's log-probs are of logits / 0.7, and so are the learner's in RL (logp_old,
    the policy, the mismatch probe) and the KL reference's: the importance ratios compare like with like."""
    job = load_job(SMOKE, ["sampling.temperature=0.7"])
    temperature = job.sampling.temperature
    student = resolve_model(job.models.student, tmp_path_factory.mktemp("student"))
    tokenizer = AutoTokenizer.from_pretrained(student)
    prompts = pa.table({"prompt_ids": [encode_prompt(tokenizer, f"Calculate {a} * 3.") for a in range(4)]})
    pool = rollout_pool(student, job.resources.rollout, seed=job.seed)
    learner = LearnerGroup(student, job.resources.learner, **job.rl.optimizer.model_dump(), temperature=temperature,
                           seed=job.seed)
    reference = reference_actor(student, job.resources.reference)
    try:
        [(_, generated, _)] = pool.map("generate", [ray.put(prompts)], n=2, seed=0, max_tokens=8,
                                       temperature=temperature)
        batch = ray.get(generated)
        batch = schema.append_column(batch, schema.ADVANTAGE, np.tile([1.0, -1.0], batch.num_rows // 2))
        batch_ref = ray.put(batch)
        rollout_logp = flat(batch.column(schema.ROLLOUT_LOGPROBS))
        raw, _ = pool.actors[0].score.remote(batch_ref, column=schema.REF_LOGPROBS)  # temperature 1: the raw model
        assert np.abs(flat(ray.get(raw).column(schema.REF_LOGPROBS)) - rollout_logp).max() > 0.05
        np.testing.assert_allclose(flat(ray.get(learner.logprobs(batch_ref))), rollout_logp, atol=1e-4)
        assert mismatch(learner, pool, probe_batch(batch))["mismatch_max"] < 1e-4
        referenced, _ = reference.score.remote(batch_ref, column=schema.REF_LOGPROBS, temperature=temperature)
        np.testing.assert_allclose(flat(ray.get(referenced).column(schema.REF_LOGPROBS)), rollout_logp, atol=1e-4)
        # the same samples as multi-turn rows: the probe compares the policy's tokens (the learner gives 0.0 at the
        # environment's), and the reference scores 0.0 there too
        multi_turn = as_multi_turn(batch, seed=1)
        policy = schema.policy_tokens(multi_turn)
        assert (~policy).any()
        assert mismatch(learner, pool, probe_batch(multi_turn))["mismatch_max"] < 1e-4
        multi_referenced, _ = reference.score.remote(ray.put(multi_turn), column=schema.REF_LOGPROBS,
                                                     temperature=temperature)
        np.testing.assert_allclose(flat(ray.get(multi_referenced).column(schema.REF_LOGPROBS)),
                                   np.where(policy, rollout_logp, 0.0), atol=1e-4)
        # logp_old matches the rollout (no TIS weight leaves 1 +- 1e-4) and the policy the reference (no KL)
        stats = learner.step(referenced, Grpo(tis_cap=1.0001, kl_coef=0.1))
        assert stats["tis_capped_fraction"] == 0.0 and stats["kl_ref"] < 1e-8
    finally:
        learner.shutdown()
        pool.shutdown()
        ray.kill(reference)
