"""Running `pear-ray` on a job in a subprocess, as a user does, and reading its metrics back."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from pear_ray.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[2]
PEAR_RAY = str(Path(sys.executable).parent / "pear-ray")
SMALL = [  # the smoke job made smaller still
    "task.num_train=16", "task.num_eval=4", "score.teacher_sft_steps=20", "score.samples_per_prompt=2",
    "sft.batch_size=8", "rl.steps=2", "rl.prompts_per_step=2", "rl.group_size=4", "eval.n=2", "eval.k=[1,2]",
]
TINY_EXPERIMENT = [  # pear-vs-sft made tiny: no RL, a short prior, a handful of prompts
    "seeds=[0,1]", "stages=[score,sft,eval]", "sft.variants=[none,token]", "task.num_train=32", "task.num_eval=6",
    "models.student.prior.steps=4", "models.student.prior.num_prompts=32", "sft.epochs=1", "sft.batch_size=16",
    "eval.n=2", "eval.k=[1,2]", "models.student.tiny.hidden_size=64", "models.student.tiny.num_heads=2",
    "models.student.tiny.num_kv_heads=2", "models.student.tiny.intermediate_size=128",
]


def pear_ray(*args: str, cwd: Path = ROOT, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([PEAR_RAY, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, **kwargs)


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        stop_group(process)
    assert process.returncode == 0, output[-5000:]
    return output


def stop_group(process: subprocess.Popen) -> None:
    """Stop what the test started: the CLI and everything it spawned (its session)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def steps(run_dir: Path, stage: str) -> list[dict]:
    return sorted((r for r in read_metrics(run_dir) if r["stage"] == stage), key=lambda r: r["step"])
