"""One student prior for every seed of an experiment (models.student.prior.seed): trained once, reused by each cell."""

import json
from pathlib import Path

import pytest
from support.cli import TINY_EXPERIMENT, finish, pear_ray, steps

SHARED_PRIOR = [*TINY_EXPERIMENT, "models.student.prior.seed=0", "sft.variants=[none]",
                "resources.rollout.engine={backend: transformers}"]


def prior_of_every_cell(job_dir: Path) -> Path:
    """The one prior folder under priors/, after checking that every cell's state.json records it as its prior."""
    [prior] = (job_dir / "priors").iterdir()
    for seed in (0, 1):
        assert json.loads((job_dir / f"seed{seed}" / "state.json").read_text())["done"]["prior"] == \
            f"../priors/{prior.name}"
    return prior


@pytest.mark.slow  # two tiny cells side by side, about 1.5 minutes; test_gate's experiment shares a prior sequentially
def test_cells_side_by_side_start_from_one_prior_trained_once(tmp_path):
    job_dir = tmp_path / "experiment"
    output = finish(pear_ray("run", "jobs/pear-vs-sft.yaml", *SHARED_PRIOR, "parallel_cells=2", "--run-dir",
                             str(job_dir)))
    assert "training the prior seed0-" in output and "shared by 2 cells" in output
    prior = prior_of_every_cell(job_dir)
    assert prior.name.startswith("seed0-") and (prior / "model.safetensors").is_file()
    trained = [len(steps(job_dir / f"seed{seed}", "prior_sft")) for seed in (0, 1)]
    assert trained == [4, 0]  # models.student.prior.steps, in the first cell's folder only
    assert (job_dir / "report.md").is_file()
