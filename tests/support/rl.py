"""The RL stage alone on a tiny model, rewarded by response length (so the groups of a step differ)."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from pear_ray.config import parse_job
from pear_ray.stages import rl as rl_stage
from pear_ray.stages.common import Run
from pear_ray.tracking import MetricsLogger, read_metrics

REWARD = Path(__file__).parent / "plugins" / "reward_example.py"


def run_rl(run_dir: Path, model: Path, *, resume: bool = False, rollout: dict | None = None, ranks: int = 1,
           lora: dict | None = None, reference: Path | None = None, task: dict | None = None,
           **rl) -> tuple[list[dict], dict]:
    """The stage's metrics rows and the exported weights; `rollout` adds to resources.rollout, `task` to task, `rl`
    to rl; `lora`: models.student.lora; `reference`: models.reference's folder."""
    job = parse_job({
        "name": "rl", "loggers": [], "models": {"student": {"path": str(model), "lora": lora},
                                                "reference": None if reference is None else {"path": str(reference)}},
        "task": {"kind": "addition", "num_train": 16, "num_eval": 2, "reward": f"{REWARD}:length_reward",
                 **(task or {})},
        "sampling": {"temperature": 1.0, "max_tokens": 8},
        "rl": {"steps": 3, "prompts_per_step": 2, "group_size": 4, "optimizer": {"lr": 1e-3}, "save_rollouts": True,
               **rl},
        "resources": {"rollout": {"num_actors": 1, "num_cpus": 0.5, **(rollout or {})},
                      "learner": {"num_ranks": ranks, "num_cpus": 0.5}},
    })
    with MetricsLogger(run_dir, resume=resume, loggers=()) as metrics:
        out = rl_stage.run_rl(Run(job, run_dir, metrics, model), "none", model)
    rows = sorted((r for r in read_metrics(run_dir) if r["stage"] == "rl"), key=lambda r: r["step"])
    return rows, load_file(str(out / "model.safetensors"))


def samples(run_dir: Path, step: int):
    """Step `step`'s saved rollouts (rl.save_rollouts)."""
    return pq.read_table(run_dir / "rollouts" / "rl-none" / f"step-{step:06d}.parquet")


@contextmanager
def stopped_in_step(monkeypatch, step: int) -> Iterator[None]:
    """The RL run inside the block dies in `step` (1-based), after the checkpoints before it."""
    batch = rl_stage.RolloutBatches.batch

    def dies(self, index):
        if index == step - 1:
            raise RuntimeError("killed")
        return batch(self, index)

    monkeypatch.setattr(rl_stage.RolloutBatches, "batch", dies)
    try:
        with pytest.raises(RuntimeError, match="killed"):
            yield
    finally:
        monkeypatch.setattr(rl_stage.RolloutBatches, "batch", batch)

