"""RL on LoRA adapters (models.student.lora): each sync sends the learner's adapters alone, the rollout engines serve
the start model + that adapter (vLLM in a LoRA slot, transformers through peft), and what they sample and score is
what the learner trains: the mismatch probe after every sync, on both backends. A run stopped after a checkpoint
resumes to the uninterrupted result."""

import numpy as np
import pytest
from safetensors.torch import load_file
from support.rl import run_rl, samples, stopped_in_step

LORA = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}


def run(run_dir, model, backend: str, **kwargs):
    return run_rl(run_dir, model, rollout={"engine": {"backend": backend}}, lora=LORA, checkpoint_every=2, **kwargs)


def adapter_bytes(weights: dict) -> int:
    """fp32 bytes of rank-r adapters (A: r x in, B: out x r) on every targeted layer of the model."""
    return sum(LORA["r"] * sum(tensor.shape) * 4 for name, tensor in weights.items()
               if name.endswith(".weight") and name.split(".")[-2] in LORA["target_modules"])


@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_each_sync_sends_the_adapters_alone_and_the_engines_serve_what_the_learner_trains(ray_cluster, tiny_model_dir,
                                                                                          tmp_path, backend):
    rows, weights = run(tmp_path, tiny_model_dir, backend)
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["trained_samples"] > 0 for r in rows)
    assert all(r["sync_bytes"] == adapter_bytes(start) for r in rows)
    assert adapter_bytes(start) * 10 < sum(t.numel() * 4 for t in start.values())
    assert all(r["mismatch_max"] < 1e-5 for r in rows), [r["mismatch_max"] for r in rows]
    changed = {name for name in start if not np.array_equal(weights[name].numpy(), start[name].numpy())}
    assert changed and all(name.split(".")[-2] in LORA["target_modules"] for name in changed)


@pytest.mark.slow  # about 30 s: two RL runs; every RL resume goes through the same loop
def test_a_lora_run_resumes_from_its_adapter_checkpoint_to_the_uninterrupted_result(ray_cluster, tiny_model_dir,
                                                                                     tmp_path, monkeypatch):
    """Stopped in step 3, after the step-2 checkpoint (the adapters and their optimizer state)."""
    rows, weights = run(tmp_path / "uninterrupted", tiny_model_dir, "transformers")
    with stopped_in_step(monkeypatch, 3):
        run(tmp_path / "resumed", tiny_model_dir, "transformers")
    resumed_rows, resumed = run(tmp_path / "resumed", tiny_model_dir, "transformers", resume=True)
    assert [r["step"] for r in resumed_rows] == [1, 2, 3]
    assert samples(tmp_path / "resumed", 3).equals(samples(tmp_path / "uninterrupted", 3))
    assert [r["loss"] for r in resumed_rows] == [r["loss"] for r in rows]
    assert all(np.array_equal(resumed[name].numpy(), weights[name].numpy()) for name in weights)
