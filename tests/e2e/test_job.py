"""End to end: `pear-ray run` through score, SFT, RL and eval on tiny models, and resuming a killed run."""

import json
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from support.cli import SMALL, finish, pear_ray, steps, stop_group
from transformers import AutoModelForCausalLM, AutoTokenizer

from pear_ray.objectives import mean_pass_at_k


def test_a_small_job_runs_every_stage(tmp_path):
    run_dir = tmp_path / "run"
    console = finish(pear_ray("run", "jobs/smoke.yaml", *SMALL, "--run-dir", str(run_dir)))
    # the console: the engines' output goes to the run folder, the bars carry figures, the results are printed
    assert not [line for line in console.splitlines() if "WARNING" in line and "pid=" in line], console
    logs = "".join(path.read_text(errors="replace") for path in (run_dir / "logs").glob("worker-*.log"))
    assert "vllm" in logs.lower()
    assert "loss=" in console and "reward=" in console and "pass@2=" in console
    assert "| SFT variant |" in console and "| token |" in console
    assert f"report: {run_dir / 'report.md'}" in console
    state = json.loads((run_dir / "state.json").read_text())["done"]
    assert set(state) == {"score", "sft/token", "eval_sft/token", "rl/token", "eval_rl/token"}
    data = pq.read_table(run_dir / "data" / "sft.parquet")
    assert data.num_rows == 32  # 16 prompts x 2 teacher samples, behaviour log-probs recorded
    assert data.column("behavior_logprobs").equals(data.column("rollout_logprobs"))
    for name in ("sft-token", "rl-token"):
        AutoModelForCausalLM.from_pretrained(run_dir / "models" / name)  # exported Hugging Face folders
    assert [r["step"] for r in steps(run_dir, "sft")] == [1, 2, 3, 4]  # 32 rows / 8
    assert [r["step"] for r in steps(run_dir, "rl")] == [1, 2]
    # a reasoning-gym task names no response styles: no shares in RL, nor style counts or shares in eval
    assert not [name for r in steps(run_dir, "rl") for name in r if name.startswith("share_")]
    for stage in ("eval_sft", "eval_rl"):
        [result] = steps(run_dir, stage)
        assert 0 <= result["pass@1"] <= result["pass@2"] <= 1 and result["num_prompts"] == 4
        per_prompt = pq.read_table(run_dir / "eval" / f"{stage[5:]}-token.parquet").to_pydict()
        assert per_prompt["stage"] == [stage[5:]] * 4 and per_prompt["variant"] == ["token"] * 4
        for k in (1, 2):  # the per-prompt counts give back the logged pass@k
            assert mean_pass_at_k(per_prompt["correct"], 2, k) == pytest.approx(result[f"pass@{k}"], abs=1e-12)
        assert not [name for name in (*per_prompt, *result) if name.startswith(("style_", "share_"))]  # as above
    report = (run_dir / "report.md").read_text()
    assert "| token |" in report and "pass@2 after RL" in report
    assert (run_dir / "plots" / "sft_loss.png").stat().st_size > 1000
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))


@pytest.mark.slow  # about a minute; the default suite kills runs harder in test_run_folder and test_learner_lost
def test_a_run_killed_during_sft_resumes_to_the_same_steps_and_samples(tmp_path):
    job = ["jobs/smoke.yaml", *SMALL, "stages=[score,sft]", "sft.batch_size=2", "sft.epochs=2",
           "sft.checkpoint_every=3", "models.student.tiny.hidden_size=256", "models.student.tiny.num_heads=8",
           "models.student.tiny.num_kv_heads=8", "models.student.tiny.num_layers=4"]
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    finish(pear_ray("run", *job, "--run-dir", str(uninterrupted)))

    process = pear_ray("run", *job, "--run-dir", str(interrupted))
    deadline = time.monotonic() + 600
    while not (interrupted / "checkpoints" / "sft-token" / "latest").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)  # as a scheduler or `kill` would
    process.communicate(timeout=120)
    stop_group(process)
    done = json.loads((interrupted / "state.json").read_text())["done"]
    assert "sft/token" not in done, "the kill came too late to test a resume"
    killed_at = max(r["step"] for r in steps(interrupted, "sft"))

    finish(pear_ray("run", *job, "--run-dir", str(interrupted)))
    resumed, full = steps(interrupted, "sft"), steps(uninterrupted, "sft")
    assert [r["step"] for r in resumed] == [r["step"] for r in full] == list(range(1, 33))  # 32 rows x 2 / 2
    assert resumed[-1]["samples_seen"] == full[-1]["samples_seen"] == 64
    assert killed_at < 32
    for a, b in zip(resumed, full, strict=True):  # same batches, same optimizer state: same losses
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)


def token_logprobs_by_transformers(model_dir: Path, table) -> list[float]:
    """Every response token's log-prob under the model, one plain transformers forward per row."""
    import torch

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt, response in zip(table.column("prompt_ids").to_pylist(), table.column("response_ids").to_pylist()):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
        out += torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None])[:, 0].tolist()
    return out


@pytest.mark.slow  # about a minute; frozen targets (test_rollout) and RL's KL reference (test_lost_actors) run alone
def test_frozen_target_and_reference_model_end_to_end(tmp_path):
    """sft.pear.target_mode frozen trains: models.reference scores the SFT data once, before SFT, into
    data/sft-ref.parquet, and is also RL's KL reference (a different model from the RL start: KL > 0 at step 1)."""
    run_dir = tmp_path / "run"
    finish(pear_ray("run", "jobs/smoke.yaml", *SMALL, "stages=[score,sft,rl]", "sft.pear.target_mode=frozen",
                    "models.reference.tiny.seed=3", "rl.objective.kl_coef=0.1", "rl.drop_constant_groups=false",
                    "--run-dir", str(run_dir)))
    assert [r["step"] for r in steps(run_dir, "sft")] == [1, 2, 3, 4]
    data = pq.read_table(run_dir / "data" / "sft-ref.parquet")
    assert data.num_rows == 32
    ref = np.concatenate(data.column("ref_logprobs").to_pylist())
    np.testing.assert_allclose(ref, token_logprobs_by_transformers(run_dir / "models" / "reference", data), atol=1e-4)
    student = token_logprobs_by_transformers(run_dir / "models" / "student", data)
    assert np.abs(ref - student).max() > 0.01  # the reference's log-probs, not the student's
    [first, _] = steps(run_dir, "rl")
    assert first["kl_ref"] > 1e-3


@pytest.mark.slow  # two runs; the default kill test (test_run_folder) also drops a killed attempt's rows
def test_a_stage_restarted_from_scratch_logs_each_step_once(tmp_path):
    """A run that died in SFT before its first checkpoint trains the variant again from step 1: the rows the
    first attempt logged go, instead of standing twice in metrics.jsonl."""
    run_dir = tmp_path / "run"
    job = ["jobs/smoke.yaml", *SMALL, "stages=[score,sft]"]
    finish(pear_ray("run", *job, "--run-dir", str(run_dir)))
    state = json.loads((run_dir / "state.json").read_text())
    del state["done"]["sft/token"]  # as if killed after its last step, before the stage was recorded
    (run_dir / "state.json").write_text(json.dumps(state))
    finish(pear_ray("run", *job, "--run-dir", str(run_dir)))
    assert [r["step"] for r in steps(run_dir, "sft")] == [1, 2, 3, 4]


@pytest.mark.slow  # a scoring run for one setting's batches
def test_the_teacher_trains_on_response_texts_when_given(tmp_path):
    """score.teacher_data: the teacher's SFT batches are the file's responses (worked traces), not the gold
    answers, which are 2-3 tokens here."""
    trace = "Work: add the digits, carry, then write the sum. Answer: 7"
    lines = [json.dumps({"prompt": f"What is {a} + 3?", "response": trace}) for a in range(16)]
    (tmp_path / "teacher.jsonl").write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    finish(pear_ray("run", "jobs/smoke.yaml", *SMALL, "stages=[score]", "score.teacher_sft_steps=3",
                    f"score.teacher_data={tmp_path / 'teacher.jsonl'}", "--run-dir", str(run_dir)))
    tokens_per_response = len(AutoTokenizer.from_pretrained(run_dir / "models" / "student").encode(trace, add_special_tokens=False)) + 1
    assert [r["num_tokens"] for r in steps(run_dir, "teacher_sft")] == [8 * tokens_per_response] * 3
