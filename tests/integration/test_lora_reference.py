"""RL's KL reference under LoRA is the learner's own base, adapters off: its log-probs are the start model's once
the adapters have trained, and a run scored so starts no reference actor and trains as one whose reference actor
loads the start model again.

Real Ray, real DeepSpeed on CPU (gloo), the tiny Qwen2 model.
"""

from __future__ import annotations

import numpy as np
import pytest
import ray
from support.learner import make_batch
from support.rl import run_rl

from pear_ray.actors.learner import LearnerGroup
from pear_ray.config import LearnerResources, LoraConfig
from pear_ray.engines.hf_scorer import HfScorer
from pear_ray.objectives import PearSft
from pear_ray.stages import rl as rl_stage

LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}
KL = {"objective": {"kl_coef": 0.1}, "optimizer": {"lr": 1e-2}}  # a large lr: the KL is far above the tolerance


def values(column) -> np.ndarray:
    return np.concatenate(column.to_pylist())


def test_adapters_off_the_learner_scores_its_start_model(ray_cluster, tiny_model_dir):
    """Two ranks and a token budget, so that the rows are sharded and micro-batched and one rank runs fillers."""
    batch, temperature = make_batch(5, seed=31), 0.7
    resources = LearnerResources(num_ranks=2, zero_stage=2, num_cpus=0.25, max_tokens_per_micro_batch=24)
    group = LearnerGroup(tiny_model_dir, resources, lora=LoraConfig(**LORA), lr=1e-2, seed=0,
                         temperature=temperature)
    try:
        for _ in range(2):
            group.step(ray.put(batch), PearSft(level="none"))
        policy, reference = (values(ray.get(ref)) for ref in (group.logprobs(batch), group.reference_logprobs(batch)))
    finally:
        group.shutdown()
    base = values(HfScorer(tiny_model_dir).logprobs(batch, temperature))
    assert np.abs(policy - base).max() > 1e-4  # the adapters have moved the policy
    np.testing.assert_allclose(reference, base, rtol=0, atol=1e-6)


@pytest.mark.slow  # about 40 s: two RL runs; the adapters-off scores are checked in the default suite
def test_a_lora_run_takes_its_kl_reference_from_the_learner_and_trains_as_with_a_reference_actor(
        ray_cluster, tiny_model_dir, tmp_path, monkeypatch):
    started = []

    def counted(model_dir, resources):
        started.append(model_dir)
        return reference_pool(model_dir, resources)

    reference_pool = rl_stage.reference_pool
    monkeypatch.setattr(rl_stage, "reference_pool", counted)
    rows, weights = run_rl(tmp_path / "base", tiny_model_dir, lora=LORA, **KL)
    assert started == []
    actor_rows, actor_weights = run_rl(tmp_path / "actor", tiny_model_dir, lora=LORA, **KL,
                                       reference=tiny_model_dir)
    assert len(started) == 1
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["trained_samples"] > 0 for r in rows)
    assert rows[-1]["kl_ref"] > 1e-4  # the adapters have moved the policy off its reference
    for name in ("loss", "kl_ref"):
        np.testing.assert_allclose([r[name] for r in rows], [r[name] for r in actor_rows], rtol=0, atol=1e-5)
    for name in weights:
        np.testing.assert_allclose(weights[name].numpy(), actor_weights[name].numpy(), rtol=0, atol=1e-5)
