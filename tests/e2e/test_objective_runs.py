"""Objectives end to end on the smoke job: PEAR over the distillation loss and on-policy distillation as variants of
one comparison. (A plug-in RL objective runs in the RL stage alone: integration/test_rl_pipeline.py.)"""

import numpy as np
import pyarrow.parquet as pq
import pytest
from support.cli import SMALL, finish, pear_ray, steps

from pear_ray.tracking import read_metrics


@pytest.mark.slow  # about a minute and a half: a full job with two variants (the objectives' math is in test_objectives)
def test_distillation_variants_side_by_side(tmp_path):
    """PEAR over the distillation loss and on-policy distillation in one comparison: the teacher's top-k is
    recorded while it writes the data, `token+distill` trains on it, `none+opd` trains on the teacher's scores of
    the student's own samples, and both reach the report."""
    run_dir = tmp_path / "run"
    finish(pear_ray("run", "jobs/smoke.yaml", *SMALL, "sft.variants=[token+distill,none+opd]",
                    "score.teacher_topk=4", "--run-dir", str(run_dir)))
    data = pq.read_table(run_dir / "data" / "sft.parquet")
    topk = data.column("teacher_topk").to_pylist()
    assert all(len(tokens) == len(ids) for tokens, ids in zip(topk, data.column("response_ids").to_pylist()))
    # the sampled token's log-prob is the teacher's entry for it whenever it is among the top 4
    for tokens, ids, logps in zip(topk, data.column("response_ids").to_pylist(),
                                  data.column("behavior_logprobs").to_pylist()):
        for candidates, token, logp in zip(tokens, ids, logps):
            match = [c["logprob"] for c in candidates if c["id"] == token]
            assert not match or abs(match[0] - logp) < 1e-5
    sft = [r for r in steps(run_dir, "sft") if r["variant"] == "token+distill"]
    assert sft and all(r["loss"] >= 0 and np.isfinite(r["grad_norm"]) for r in sft)  # a KL, PEAR-weighted
    rl = {v: [r for r in steps(run_dir, "rl") if r["variant"] == v] for v in ("token+distill", "none+opd")}
    assert all("reverse_kl" in r for r in rl["none+opd"]) and all("reverse_kl" not in r for r in rl["token+distill"])
    assert all(np.isfinite(r["reverse_kl"]) for r in rl["none+opd"])
    # every group is kept: distillation needs no reward signal
    assert all(r["kept_fraction"] == 1.0 for r in rl["none+opd"])
    report = (run_dir / "report.md").read_text()
    assert "token+distill" in report and "none+opd" in report
    evals = {r["variant"] for r in read_metrics(run_dir) if r["stage"] == "eval_rl"}
    assert evals == {"token+distill", "none+opd"}
