"""The reward pool on tiny models built here (a one-label Qwen2 classifier, an untrained Qwen2 judge): a lost actor
is replaced and its batches scored again to the same scores; a judge answer with no mark, a batch past its time or a
model that raises gives 0 and is counted; and eval and RL log the models' scores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import ray
from support.rl import run_rl

from pear_ray.actors.reward import RewardModels, pool_rewards, reward_pool
from pear_ray.config import ClassifierReward, RewardResources, TaskConfig, parse_job
from pear_ray.data import schema
from pear_ray.models import TinyModelSpec, build_tiny_model
from pear_ray.rewards import build_tiny_classifier
from pear_ray.stages.common import Run
from pear_ray.stages.evaluate import run_eval
from pear_ray.tracking import MetricsLogger, read_metrics

ROWS = 12
TEMPLATE = "Question: {prompt}\nAnswer: {response}\nGrade the answer from 0 to 10."


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("reward-models")
    return {"helpful": build_tiny_classifier(TinyModelSpec(seed=1), folder / "classifier"),
            "judge": build_tiny_model(TinyModelSpec(seed=2), folder / "judge")}


def reward_models(folders: dict[str, Path], **judge) -> list:
    return TaskConfig(kind="addition", reward_models=[
        {"kind": "classifier", "name": "helpful", "path": str(folders["helpful"]), "batch_rows": 3},
        {"kind": "judge", "name": "judge", "path": str(folders["judge"]), "template": TEMPLATE, "max_tokens": 8,
         **judge}]).reward_models


def samples(rows: int = ROWS) -> pa.Table:
    return pa.table({schema.PROMPT: [f"What is {i} + {i}?" for i in range(rows)],
                     schema.RESPONSE: [f"The answer is {2 * i + i % 3}." for i in range(rows)],
                     schema.ANSWER: [str(2 * i) for i in range(rows)]})


def test_a_lost_actor_is_replaced_and_its_batches_scored_again_alike(ray_cluster, folders):
    models = reward_models(folders)
    table = samples()
    whole = reward_pool({name: str(path) for name, path in folders.items()}, models,
                        RewardResources(num_actors=1, num_cpus=0.5))
    try:
        expected, expected_counts = pool_rewards(whole, table, batch_rows=2)
    finally:
        whole.shutdown()
    pool = reward_pool({name: str(path) for name, path in folders.items()}, models,
                       RewardResources(num_actors=2, num_cpus=0.5))
    killed = []

    def kill_the_first_actor(stats: dict) -> None:
        """After the first batch comes back, the actor of slot 0 dies with work in flight or about to get some."""
        if not killed:
            killed.append(pool.slots[0].actor)
            ray.kill(killed[0])

    pool.dispatcher.on_result = kill_the_first_actor
    try:
        scores, counts = pool_rewards(pool, table, batch_rows=2)
        stats = pool.stats
    finally:
        pool.shutdown()
    assert killed and stats.actors_replaced == 1 and stats.resubmitted >= 1
    assert scores.num_rows == ROWS and scores.equals(expected)
    assert counts == expected_counts
    helpful = scores.column("reward_helpful").to_numpy()
    assert ((0 < helpful) & (helpful < 1)).all() and len(set(helpful.tolist())) > 1  # sigmoid of distinct logits


def test_an_unparsed_answer_a_batch_past_its_time_or_a_raise_gives_0_and_is_counted(ray_cluster, folders, tmp_path):
    """The untrained judge writes no `Score: n`; a row budget of a nanosecond times out every batch; a classifier
    without a pad token id raises on every batch of more than one sample (transformers: "Cannot handle batch sizes >
    1 if no padding token is defined")."""
    unpadded = Path(shutil.copytree(folders["helpful"], tmp_path / "unpadded"))
    config = json.loads((unpadded / "config.json").read_text())
    (unpadded / "config.json").write_text(json.dumps(config | {"pad_token_id": None}))
    models = [*reward_models(folders, score_pattern=r"Score: (\d+)"), ClassifierReward(
        kind="classifier", name="unpadded", path=str(unpadded), batch_rows=2)]
    models[0] = models[0].model_copy(update={"row_timeout_s": 1e-9})
    scorer = RewardModels.start({**{name: str(path) for name, path in folders.items()}, "unpadded": str(unpadded)},
                                models, RewardResources(num_actors=1, num_cpus=0.5))
    try:
        table, counts = scorer.add_scores(samples(6))
    finally:
        scorer.shutdown()
    for name in ("judge", "helpful", "unpadded"):
        assert table.column(f"reward_{name}").to_pylist() == [0.0] * 6
    assert counts == {"reward_helpful_errors": 0, "reward_helpful_timeouts": 6, "reward_judge_errors": 0,
                      "reward_judge_timeouts": 0, "reward_judge_unparsed": 6, "reward_unpadded_errors": 6,
                      "reward_unpadded_timeouts": 0}
    assert table.column(schema.PROMPT).equals(samples(6).column(schema.PROMPT))  # the table's own columns kept


def test_eval_logs_the_models_mean_scores_and_keeps_pass_at_k_on_the_verifier(ray_cluster, folders, tiny_model_dir,
                                                                              tmp_path):
    job = parse_job({
        "name": "reward-models", "loggers": [], "models": {"student": {"path": str(tiny_model_dir)}},
        "task": {"kind": "addition", "args": {"digits": 1}, "num_train": 8, "num_eval": 4,
                 "reward_models": [{"kind": "classifier", "name": "helpful", "tiny": {"seed": 1}},
                                   {"kind": "judge", "name": "judge", "path": str(folders["judge"]),
                                    "template": TEMPLATE, "max_tokens": 4}]},
        "sampling": {"max_tokens": 8}, "eval": {"n": 2, "k": [1]},
        "resources": {"rollout": {"num_actors": 1, "num_cpus": 0.5, "engine": {"backend": "transformers"}},
                      "reward": {"num_cpus": 0.5}},
    })
    with MetricsLogger(tmp_path, resume=False, loggers=()) as metrics:
        results = run_eval(Run(job, tmp_path, metrics, tiny_model_dir), "none", tiny_model_dir, "sft")
    [logged] = [row for row in read_metrics(tmp_path) if row["stage"] == "eval_sft"]
    assert 0 < logged["reward_helpful"] < 1 and logged["reward_judge"] == 0.0  # the untrained judge gives no mark
    assert logged["reward_judge_unparsed"] == 8 and logged["reward_judge_errors"] == 0  # 4 prompts x 2 samples
    assert logged["pass@1"] == results["pass@1"] and logged["mean_reward"] == logged["pass@1"]  # the verifier's
    classifier = tmp_path / "models" / "reward-helpful"
    assert (classifier / "config.json").is_file()  # the tiny classifier, built into the run folder


def test_rl_trains_on_the_combined_reward_and_logs_its_parts(ray_cluster, folders, tiny_model_dir, tmp_path):
    rows, _ = run_rl(tmp_path, tiny_model_dir, steps=2, rollout={"engine": {"backend": "transformers"}}, task={
        "verifier_weight": 0.5,
        "reward_models": [{"kind": "classifier", "name": "helpful", "path": str(folders["helpful"]), "weight": 2.0}]})
    for row in rows:
        assert row["reward"] == pytest.approx(0.5 * row["verifier_reward"] + 2.0 * row["reward_helpful"], abs=1e-12)
        assert 0 < row["reward_helpful"] < 1
        assert row["reward_helpful_errors"] == row["reward_helpful_timeouts"] == 0
