"""Named SFT variants through the real SFT stage: each variant's own PEAR settings reach the DeepSpeed learner."""

import pyarrow.parquet as pq
import pytest
import torch
from support.learner import make_batch

from pear_ray.config import parse_job
from pear_ray.data import schema
from pear_ray.data.tensors import to_tensors
from pear_ray.engines.hf_scorer import HfScorer
from pear_ray.objectives import pear_weights
from pear_ray.stages.common import Run
from pear_ray.stages.sft import run_sft
from pear_ray.tracking import MetricsLogger, read_metrics

CLIPS = {"paper": (-0.08, 0.3), "wide": (-1.0, 0.3)}  # token level, gamma 0.99, one clip each


def hand_mean_weight(model_dir, data, delta_clip) -> float:
    """pear_weights' mean over the response tokens, the target being the model's own log-probs before any step."""
    scored = schema.append_column(data, schema.REF_LOGPROBS, HfScorer(model_dir).logprobs(data))
    tensors = to_tensors(scored, pad_id=0, columns=(schema.REF_LOGPROBS, schema.BEHAVIOR_LOGPROBS))
    mask = tensors["response_mask"]
    weights = pear_weights(tensors[schema.REF_LOGPROBS], tensors[schema.BEHAVIOR_LOGPROBS], mask, level="token",
                           gamma=0.99, delta_clip=delta_clip)
    return float(weights[mask].to(torch.float64).mean())


def test_each_variant_s_own_clip_reaches_the_learner(ray_cluster, tiny_model_dir, tmp_path):
    """Two token-level variants that differ only in delta_clip, one SFT step each on the same 4 rows: the first
    step's logged mean weight is, for each, what pear_weights gives by hand with that variant's clip."""
    data = make_batch(4, seed=3).select([schema.PROMPT_IDS, schema.RESPONSE_IDS, schema.BEHAVIOR_LOGPROBS])
    data_path = tmp_path / "sft.parquet"
    pq.write_table(data, data_path)
    job = parse_job({
        "name": "variants", "loggers": [], "models": {"student": {"path": str(tiny_model_dir)}},
        "sft": {"batch_size": 4, "pear": {"gamma": 0.99},
                "variants": [{"name": "paper", "level": "token"},
                             {"name": "wide", "level": "token", "delta_clip": list(CLIPS["wide"])}]},
        "resources": {"learner": {"num_ranks": 1, "num_cpus": 0.5}},
    })
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, resume=False, loggers=()) as metrics:
        run = Run(job, run_dir, metrics, tiny_model_dir)
        for name in CLIPS:
            run_sft(run, name, data_path)
    first = {row["variant"]: row["mean_weight"] for row in read_metrics(run_dir)
             if row["stage"] == "sft" and row["step"] == 1}
    expected = {name: hand_mean_weight(tiny_model_dir, data, clip) for name, clip in CLIPS.items()}
    assert first == pytest.approx(expected, rel=1e-5)
    assert abs(expected["wide"] - expected["paper"]) > 0.05, "the two clips should give different weights here"
