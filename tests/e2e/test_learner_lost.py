"""A learner rank that dies mid-SFT (SIGKILL, as the OOM killer or a lost node would) fails the stage with one clear
message, and the same command resumes it from the last checkpoint; with resources.learner.max_restarts the stage
restarts by itself. Either way every step is logged once, and the steps run again after the checkpoint give the losses
they gave before the kill (same data order, optimizer and RNG state)."""

import json
import time
from pathlib import Path

import psutil
import pytest
from support.cli import ROOT, finish, pear_ray, steps
from support.learner import write_scored_sft_rows

SMOKE = str(ROOT / "jobs" / "smoke.yaml")
ROWS, BATCH, EPOCHS, CHECKPOINT_EVERY = 32, 4, 12, 8  # 96 SFT steps, a checkpoint every 8
KILL_AFTER_STEP = 20


@pytest.fixture(scope="module")
def scored_data(tmp_path_factory) -> Path:
    """SFT rows that already carry behaviour log-probs, so the score stage only copies them (no vLLM)."""
    return write_scored_sft_rows(tmp_path_factory.mktemp("data") / "sft.jsonl", ROWS)


def job(scored_data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["run", SMOKE, "stages=[score,sft]", f"data.sft={scored_data}", "models.behavior=null",
            "score.teacher_sft_steps=0", f"sft.batch_size={BATCH}", f"sft.epochs={EPOCHS}",
            f"sft.checkpoint_every={CHECKPOINT_EVERY}", *extra, "--run-dir", str(run_dir)]


def kill_a_learner_rank(process, run_dir: Path, timeout: float = 300) -> dict[int, float]:
    """SIGKILL the learner rank's process (a child of the test's CLI) once SFT has logged KILL_AFTER_STEP steps;
    returns the losses logged by then, by step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and len(steps(run_dir, "sft")) >= KILL_AFTER_STEP:
            ranks = [child for child in psutil.Process(process.pid).children(recursive=True)
                     if " ".join(child.cmdline()).startswith("ray::LearnerWorker")]
            assert ranks, "no learner rank found"
            before = {r["step"]: r["loss"] for r in steps(run_dir, "sft")}
            ranks[0].kill()
            return before
        time.sleep(0.05)
    raise AssertionError(f"SFT did not reach step {KILL_AFTER_STEP}")


def assert_resumed_exactly(run_dir: Path, before_kill: dict[int, float]) -> None:
    logged = steps(run_dir, "sft")
    assert [r["step"] for r in logged] == list(range(1, ROWS // BATCH * EPOCHS + 1))  # each once, none missing
    rerun = {r["step"]: r["loss"] for r in logged if CHECKPOINT_EVERY < r["step"] <= max(before_kill)}
    assert len(rerun) >= KILL_AFTER_STEP - 2 * CHECKPOINT_EVERY  # steps trained again after the checkpoint
    assert rerun == pytest.approx({step: before_kill[step] for step in rerun}, rel=1e-6)


@pytest.mark.slow  # about a minute: two runs
def test_a_lost_learner_rank_fails_the_stage_cleanly_and_the_same_command_resumes_it(scored_data, tmp_path):
    run_dir = tmp_path / "run"
    process = pear_ray(*job(scored_data, run_dir))
    before_kill = kill_a_learner_rank(process, run_dir)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 1, output[-3000:]
    assert "Traceback" not in output
    assert "error: learner rank 0 of 1 is gone" in output and "run the same command again" in output
    assert "sft/token" not in json.loads((run_dir / "state.json").read_text())["done"]

    output = finish(pear_ray(*job(scored_data, run_dir)))
    assert "resuming at step" in output
    assert_resumed_exactly(run_dir, before_kill)


@pytest.mark.slow  # about 35 s: a rank killed and the stage restarted
def test_with_max_restarts_the_stage_restarts_by_itself_from_its_checkpoint(scored_data, tmp_path):
    run_dir = tmp_path / "run"
    process = pear_ray(*job(scored_data, run_dir, "resources.learner.max_restarts=1"))
    before_kill = kill_a_learner_rank(process, run_dir)
    output = finish(process)
    assert "restarting the stage from its last checkpoint (restart 1 of 1)" in output
    assert_resumed_exactly(run_dir, before_kill)
