"""Objectives end to end on the smoke job: a plug-in RL objective, PEAR over the distillation loss and on-policy
distillation as variants of one comparison."""

import numpy as np
import pyarrow.parquet as pq
from test_job import SMALL, finish, pear_ray, steps

from pear_ray.tracking import read_metrics

PLUGIN = "tests/plugins/objective_example.py:reinforce"


def test_a_custom_rl_objective_trains_by_import_path(tmp_path):
    run_dir = tmp_path / "run"
    objective = f"{{kind: custom, function: '{PLUGIN}', needs: [advantage], sampled: true, args: {{scale: 1.0}}}}"
    finish(pear_ray("run", "jobs/smoke.yaml", *SMALL, "stages=[score,sft,rl]", "sft.pear.level=none",
                    "rl.steps=3", "rl.drop_constant_groups=false", f"rl.objective={objective}",
                    "--run-dir", str(run_dir)))
    rl = steps(run_dir, "rl")
    assert [r["step"] for r in rl] == [1, 2, 3]
    # figures only the plug-in reports: the mean log-prob of the sampled tokens under the learner, per token
    assert all(-20 < r["logp_sum"] < 0 and r["num_tokens"] > 0 for r in rl)
    assert all("clip_fraction" not in r for r in rl)  # not GRPO's surrogate
    assert (run_dir / "models" / "rl-none" / "model.safetensors").is_file()
