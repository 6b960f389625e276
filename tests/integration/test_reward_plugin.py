"""Custom rewards by import path (`task.reward`) and tasks registered from outside pear_ray: a plug-in's values
replace the verifier's in Ray scoring and in a whole job; a bad spec or kind is refused when the job loads."""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

from pear_ray.config import ConfigError, TaskConfig, load_job
from pear_ray.data import schema
from pear_ray.tasks import TINY_ARGS, CustomReward, ReasoningGymTask, make_task, score_metadata
from pear_ray.tasks.base import prompt_table
from pear_ray.tasks.registry import KINDS, VERIFIERS, WARM_UPS, register_kind, register_verifier
from pear_ray.tasks.verify import score_chunk, score_rows
from pear_ray.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = Path(__file__).parents[1] / "support" / "plugins" / "reward_example.py"


def arithmetic(**fields) -> TaskConfig:
    return TaskConfig(args=TINY_ARGS["basic_arithmetic"], num_train=16, num_eval=6, **fields)


def reward_spec(function: str) -> str:
    return f"{EXAMPLE}:{function}"


# ---------------------------------------------------------------- custom rewards in Ray scoring


def test_the_custom_reward_replaces_the_verifier_in_ray(ray_cluster):
    config = arithmetic(reward=reward_spec("length_reward"))
    task = make_task(config)
    assert isinstance(task, CustomReward) and isinstance(task.task, ReasoningGymTask)
    assert task.prompts("eval").equals(make_task(arithmetic()).prompts("eval"))  # same prompts as the task's own
    prompts = task.prompts("eval")
    answers = prompts[schema.ANSWER].to_pylist()
    responses = [answers[0], f"={answers[1]}", "", "wrong", "x" * 30, answers[5]]
    table = schema.append_column(prompts, schema.RESPONSE, responses)
    rewards, failures = score_rows(table, config, chunk_rows=4)  # the task is built from the config
    assert failures == {"errors": 0, "timeouts": 0}
    assert rewards == [min(len(r) / 10, 1.0) for r in responses]
    builtin, _ = score_rows(table, arithmetic())
    assert builtin[:2] == [1.0, 1.0] and max(rewards[:2]) < 1.0  # right answers, short responses


def test_the_custom_reward_gets_the_row_metadata_as_a_dict():
    task = make_task(arithmetic(reward=reward_spec("names_the_dataset")))
    row = task.prompts("eval", 1).to_pylist()[0]
    assert task.score("basic_arithmetic", row[schema.ANSWER], row[schema.METADATA]) == 1.0
    assert task.score(row[schema.ANSWER], row[schema.ANSWER], row[schema.METADATA]) == 0.0


def test_a_sleeping_reward_times_out_and_a_raising_or_nan_one_is_an_error(ray_cluster):
    table = pa.table({schema.RESPONSE: ["a", "b", "c"], schema.ANSWER: ["1"] * 3})
    start = time.monotonic()
    rewards, failures = score_rows(table, arithmetic(reward=reward_spec("sleeps"), verifier_timeout_s=0.5))
    assert time.monotonic() - start < 30  # the function sleeps 60 s per row
    assert (rewards, failures) == ([0.0] * 3, {"errors": 0, "timeouts": 3})
    for function in ("raises", "not_a_number"):
        rewards, failures = score_rows(table, arithmetic(reward=reward_spec(function)))
        assert (rewards, failures) == ([0.0] * 3, {"errors": 3, "timeouts": 0}), function


# ---------------------------------------------------------------- refused when the job loads


@pytest.mark.parametrize(("spec", "why"), [
    ("length_reward", "is not of the form"),
    ("tests/support/plugins/no_such_file.py:length_reward", "no file"),
    ("tests/support/plugins/reward_example.py:no_such_function", "has no function 'no_such_function'"),
    ("no_such_package.rewards:length_reward", "cannot import 'no_such_package.rewards'"),
])
def test_a_bad_reward_spec_is_refused_when_the_job_loads(spec, why, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match=f"(?s)task.reward:.*{why}"):
        load_job("jobs/smoke.yaml", [f"task.reward={spec}"])


def test_a_reward_file_path_is_made_absolute(monkeypatch):
    """Ray workers may run in another directory: the loaded config names the file absolutely."""
    monkeypatch.chdir(ROOT / "tests" / "support")
    job = load_job(ROOT / "jobs" / "smoke.yaml", ["task.reward=plugins/reward_example.py:quarter"])
    assert job.task.reward == f"{EXAMPLE}:quarter"


def test_an_unknown_task_kind_lists_the_known_kinds():
    with pytest.raises(ConfigError, match=r"task.kind: .*unknown task kind 'adition'; known kinds: addition, "
                                          r"reasoning_gym, user"):
        load_job(ROOT / "jobs" / "smoke.yaml", ["task.kind=adition"])


# ---------------------------------------------------------------- a task registered outside pear_ray


@dataclass
class ShoutTask:
    """Test-only task: repeat a word in capitals. Its verifier, `shout`, is its own."""

    words: tuple[str, ...]
    name: str = "shout"

    def prompts(self, split, n=None):
        words = self.words[:n]
        return prompt_table([f"shout-{split}-{i}" for i in range(len(words))], [f"Shout {w}." for w in words],
                            [w.upper() for w in words], [{"verifier": "shout", "word": w} for w in words], self.name)

    def score(self, response, answer, metadata):
        return score_metadata(response, answer, metadata)


def score_shout(response, answer, meta):
    """1 for the word in capitals, 0.5 in any other case, else 0."""
    if response == meta["word"].upper():
        return 1.0
    return 0.5 if response.upper() == meta["word"].upper() else 0.0


def build_shout_task(task_config, data_config, seed):
    unknown = sorted(set(task_config.args) - {"words"})
    if unknown:
        raise ValueError(f"task.args of the shout task accepts ['words']; unknown {unknown}")
    return ShoutTask(words=tuple(task_config.args["words"]))


@pytest.fixture
def shout_registered():
    """Register the shout task and verifier (with a warm-up that records what it is given) for one test."""
    saved = [(registry, dict(registry)) for registry in (KINDS, VERIFIERS, WARM_UPS)]
    warmed = []
    register_kind("shout")(build_shout_task)
    register_verifier("shout", warm_up=warmed.extend)(score_shout)
    yield warmed
    for registry, before in saved:
        registry.clear()
        registry.update(before)


def test_a_task_registered_in_a_test_is_built_and_scored(shout_registered):
    task = make_task(TaskConfig(kind="shout", args={"words": ["hey", "ho"]}))
    assert isinstance(task, ShoutTask)
    rows = task.prompts("train").to_pylist()
    assert [(r[schema.PROMPT], r[schema.ANSWER]) for r in rows] == [("Shout hey.", "HEY"), ("Shout ho.", "HO")]
    meta = rows[0][schema.METADATA]
    assert [score_metadata(response, "HEY", meta) for response in ("HEY", "hey", "hi")] == [1.0, 0.5, 0.0]
    # scored in forked processes, after the registered warm-up ran on the metadata of the rows naming it
    chunk = [("HEY", "HEY", meta), ("Hey", "HEY", meta), ("HO", "HO", rows[1][schema.METADATA]), ("x", "1", None)]
    rewards, errors, timeouts, _ = score_chunk(task, chunk, timeout_s=5)
    assert (rewards, errors, timeouts) == ([1.0, 0.5, 1.0, 0.0], 0, 0)  # no metadata: the exact verifier
    assert shout_registered == [json.loads(meta), json.loads(meta), json.loads(rows[1][schema.METADATA])]
    with pytest.raises(ValueError, match="unknown"):
        make_task(TaskConfig(kind="shout", args={"wordz": []}))
    with pytest.raises(ValueError, match="task kind 'shout' is registered twice"):
        register_kind("shout")(build_shout_task)


# ---------------------------------------------------------------- a whole job


@pytest.mark.slow  # a whole job; the plug-in's loading and scoring are tested above without one
def test_a_job_scores_with_the_custom_reward_in_every_stage(ray_cluster, tmp_path):
    """score (teacher accuracy), RL and eval all reward through the plug-in: a constant 0.25, which no verifier
    gives, counted correct at correct_threshold 0.25."""
    from pear_ray.driver.run import run_job

    job = load_job(ROOT / "jobs" / "smoke.yaml", [
        "stages=[score,rl,eval]", "task.num_train=8", "task.num_eval=4", "score.teacher_sft_steps=0",
        "rl.steps=2", "rl.prompts_per_step=2", "rl.group_size=4", "eval.n=2", "eval.k=[1,2]",
        "eval.correct_threshold=0.25", f"task.reward={reward_spec('quarter')}"])
    run_job(job, tmp_path / "run")
    metrics = read_metrics(tmp_path / "run")
    [score] = [r for r in metrics if r["stage"] == "score"]
    assert score["teacher_accuracy"] == 1.0 and score["errors"] == 0
    rl = sorted((r for r in metrics if r["stage"] == "rl"), key=lambda r: r["step"])
    assert [(r["step"], r["reward"], r["kept_fraction"]) for r in rl] == [(1, 0.25, 0.0), (2, 0.25, 0.0)]
    [evaluation] = [r for r in metrics if r["stage"] == "eval_rl"]
    assert (evaluation["mean_reward"], evaluation["pass@1"], evaluation["verifier_errors"]) == (0.25, 1.0, 0)
    assert evaluation["pass@2"] == 1.0
