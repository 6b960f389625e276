"""Tasks: deterministic, disjoint splits; verifiers that give 1 to right answers and 0 to wrong ones, from rows read
back from Parquet; answer extraction; user data by exact match and math-verify; Ray scoring with timeouts."""

import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest
import reasoning_gym

from pear_ray.config import DataConfig, TaskConfig, parse_job
from pear_ray.data import schema
from pear_ray.data.io import DataError, read_table, write_table
from pear_ray.stages.common import Run, correct_counts, correct_mask
from pear_ray.tasks import TINY_ARGS, ReasoningGymTask, UserTask, extract_answer, make_task, math_score
from pear_ray.tasks.answers import exact_score
from pear_ray.tasks.base import PROMPT_COLUMNS
from pear_ray.tasks.verify import score_chunk, score_rows

RG_TASKS = ["basic_arithmetic", "letter_counting", "spell_backward"]


def tiny_task(name, **overrides):
    fields = {"name": name, "args": TINY_ARGS[name], "num_train": 64, "num_eval": 16, **overrides}
    return make_task(TaskConfig(**fields), seed=3)


def wrong_answer(answer: str) -> str:
    if answer.lstrip("-").isdigit():
        return str(int(answer) + 1)
    return "#" * len(answer)  # shares no letter with the gold at any position


# ---------------------------------------------------------------- answer extraction


@pytest.mark.parametrize(
    ("response", "numeric", "expected"),
    [
        ("7", True, "7"),
        ("  -12 \n", True, "-12"),
        ("3 + 4 = 7", True, "7"),
        ("Let me think.\nThe answer is **7**.", True, "7"),
        ("answer: 1,234 apples", True, "1234"),
        ("<think>2 + 2 = 4, no wait</think>\n<answer> 5 </answer>", True, "5"),
        ("<answer>5", True, "5"),  # a final tag the model did not close
        ("so $\\boxed{\\frac{1}{2}}$", False, "\\frac{1}{2}"),
        ("Final answer: olleh.", False, "olleh"),
        ("I think\nolleh\n\n", False, "olleh"),
        ("ANSWER = 'cba'", False, "cba"),
        ("no number here", True, "no number here"),
        ("", True, ""),
    ],
)
def test_extract_answer(response, numeric, expected):
    assert extract_answer(response, numeric=numeric) == expected


# ---------------------------------------------------------------- reasoning-gym tasks


def test_reasoning_gym_neighbour_seeds_share_items():
    """Why splits do not use seed and seed + 1: reasoning-gym item i of seed s is built from Random(s + i)."""
    a = reasoning_gym.create_dataset("basic_arithmetic", seed=0, size=10)
    b = reasoning_gym.create_dataset("basic_arithmetic", seed=1, size=10)
    assert a[1]["question"] == b[0]["question"]


@pytest.mark.parametrize("name", RG_TASKS)
def test_prompts_are_deterministic_for_a_seed(name):
    first, again = tiny_task(name), tiny_task(name)
    for split in ("train", "eval"):
        assert first.prompts(split).equals(again.prompts(split))
    other = make_task(TaskConfig(name=name, args=TINY_ARGS[name], num_train=64, num_eval=16), seed=4)
    assert other.prompts("train")[schema.PROMPT].to_pylist() != first.prompts("train")[schema.PROMPT].to_pylist()
    table = first.prompts("train", 5)
    assert table.column_names == list(PROMPT_COLUMNS) and table.num_rows == 5
    assert set(table[schema.TASK].to_pylist()) == {name}
    assert len(set(table[schema.ID].to_pylist())) == 5


@pytest.mark.parametrize("config", [TaskConfig(), TaskConfig(args=TINY_ARGS["basic_arithmetic"])],
                         ids=["default", "tiny_args"])
def test_no_eval_question_is_a_train_question(config):
    task = make_task(config)
    train = task.prompts("train")[schema.PROMPT].to_pylist()
    held_out = task.prompts("eval")[schema.PROMPT].to_pylist()
    assert (len(train), len(held_out)) == (config.num_train, config.num_eval)
    assert len(set(held_out)) == len(held_out)
    assert not set(train) & set(held_out)
    # more train prompts than configured (RL draws many) still avoid the eval split
    assert not set(task.prompts("train", 4 * config.num_train)[schema.PROMPT].to_pylist()) & set(held_out)
    with pytest.raises(ValueError, match="raise task.num_eval"):
        task.prompts("eval", config.num_eval + 1)


def test_small_question_space_is_reported():
    task = make_task(TaskConfig(args={**TINY_ARGS["basic_arithmetic"], "operators": ["+"]}, num_eval=5000))
    with pytest.raises(ValueError, match="distinct"):
        task.prompts("eval")


def test_bad_task_config_is_refused():
    with pytest.raises(ValueError, match="no dataset 'basic_arithmetik'"):
        make_task(TaskConfig(name="basic_arithmetik"))
    with pytest.raises(ValueError, match="do not configure"):
        make_task(TaskConfig(args={"min_term": 2}))
    with pytest.raises(ValueError, match="set by pear_ray"):
        make_task(TaskConfig(args={"seed": 1}))


@pytest.mark.parametrize("name", RG_TASKS)
def test_right_answers_score_one_and_wrong_zero_from_parquet_rows(name, tmp_path):
    """The verifier is rebuilt from the row alone (metadata JSON) after a Parquet round trip, in a fresh task."""
    write_table(tiny_task(name).prompts("eval"), tmp_path / "prompts.parquet")
    rows = read_table(tmp_path / "prompts.parquet").to_pylist()
    scorer = ReasoningGymTask(name="basic_arithmetic")  # a different task: the row's metadata decides
    for row in rows:
        answer, meta = row[schema.ANSWER], row[schema.METADATA]
        entry = json.loads(meta)["entry"]
        own = reasoning_gym.create_dataset(name, seed=0, size=1, **TINY_ARGS[name])
        assert own.score_answer(answer, entry) == 1.0  # reasoning-gym's scorer works on the rebuilt entry
        assert scorer.score(answer, answer, meta) == 1.0
        assert scorer.score(f"Let me think.\nThe answer is **{answer}**.", answer, meta) == 1.0
        assert scorer.score(f"<answer>{answer}</answer>", answer, meta) == 1.0
        assert scorer.score(wrong_answer(answer), answer, meta) == 0.0
        assert scorer.score("", answer, meta) == 0.0
        for junk in ("17", "-" + answer, answer + answer, "a b c", "\n\n"):
            assert 0.0 <= scorer.score(junk, answer, meta) <= 1.0


def test_arithmetic_gives_no_partial_credit_for_containing_the_answer():
    task = tiny_task("basic_arithmetic")
    meta = json.dumps({"verifier": "reasoning_gym", "dataset": "basic_arithmetic",
                       "entry": {"question": "Calculate 3 + 4.", "answer": "7", "metadata": {}}})
    assert task.score("17", "7", meta) == 0.0  # reasoning-gym's fallback scorer would give 0.5
    assert task.score("-7", "7", meta) == 0.0
    assert task.score("3 + 4 = 7", "7", meta) == 1.0


def test_spell_backward_keeps_its_own_partial_credit():
    task = tiny_task("spell_backward")
    row = task.prompts("train", 1).to_pylist()[0]
    answer = row[schema.ANSWER]
    assert task.score(answer.upper(), answer, row[schema.METADATA]) == 1.0  # its scorer ignores case
    partial = task.score(answer[0] + "#" * (len(answer) - 1), answer, row[schema.METADATA])
    assert 0.0 < partial < 1.0


def test_spell_backward_near_miss_is_not_correct(ray_cluster, tmp_path):
    """spell_backward credits 1/n per matching letter and takes 0.2 off a wrong answer whose letters all match,
    but only when the credits sum to exactly 1.0: for 6 letters they sum to 0.9999999999999999, so the reversed
    word plus a letter scores that. Stored as float32 it would be 1.0 and count as correct."""
    config = TaskConfig(name="spell_backward", args={"min_word_len": 6, "max_word_len": 6}, num_eval=4)
    prompts = make_task(config).prompts("eval")
    entry = json.loads(prompts[schema.METADATA][0].as_py())["entry"]
    spell_backward = reasoning_gym.create_dataset("spell_backward", seed=0, size=1, min_word_len=6, max_word_len=6)
    assert spell_backward.score_answer(entry["answer"] + "s", entry) == 0.9999999999999999
    # two samples per prompt: the right answer, then the near miss
    table = prompts.take(np.repeat(np.arange(prompts.num_rows), 2))
    table = schema.append_column(table, schema.GROUP_ID, np.repeat(np.arange(prompts.num_rows), 2))
    table = schema.append_column(table, schema.RESPONSE, [answer + suffix for answer in
                                                          prompts[schema.ANSWER].to_pylist() for suffix in ("", "s")])
    rewards, failures = score_rows(table, config)
    assert failures == {"errors": 0, "timeouts": 0}
    assert rewards == [1.0, 0.9999999999999999] * prompts.num_rows
    write_table(schema.append_column(table, schema.REWARD, rewards), tmp_path / "scored.parquet")
    scored = read_table(tmp_path / "scored.parquet")
    assert scored[schema.REWARD].to_pylist() == rewards
    assert correct_counts(scored, threshold=1.0).tolist() == [1] * prompts.num_rows
    assert correct_mask(scored, threshold=1.0).tolist() == [True, False] * prompts.num_rows


def test_reasoning_gym_task_with_exact_or_math_verifier():
    for verifier in ("exact", "math"):
        task = tiny_task("basic_arithmetic", verifier=verifier)
        row = task.prompts("train", 1).to_pylist()[0]
        assert json.loads(row[schema.METADATA])["verifier"] == verifier
        assert task.score(f"Answer: {row['answer']}", row["answer"], row["metadata"]) == 1.0
        assert task.score(wrong_answer(row["answer"]), row["answer"], row["metadata"]) == 0.0


# ---------------------------------------------------------------- the split and the job's seed


@pytest.mark.parametrize("kind", ["reasoning_gym", "user"])
def test_the_split_does_not_move_with_the_job_seed(kind, user_file, tmp_path):
    """Seeds of one experiment are evaluated on the same prompts: only task.split_seed moves the split."""
    task = ({"args": TINY_ARGS["basic_arithmetic"], "num_train": 32, "num_eval": 8} if kind == "reasoning_gym"
            else {"kind": "user", "path": str(user_file), "num_train": 15, "num_eval": 5})

    def prompts(seed: int, split_seed: int = 0) -> dict[str, list[str]]:
        job = parse_job({"name": "split", "seed": seed, "models": {"student": {"tiny": {}}},
                         "task": {**task, "split_seed": split_seed}})
        run = Run(job, tmp_path, metrics=None, student=None)
        return {split: run.task.prompts(split)[schema.PROMPT].to_pylist() for split in ("train", "eval")}

    assert prompts(seed=0) == prompts(seed=1)
    moved = prompts(seed=0, split_seed=1)
    assert moved["eval"] != prompts(seed=0)["eval"] and moved["train"] != prompts(seed=0)["train"]


# ---------------------------------------------------------------- user data


@pytest.fixture
def user_file(tmp_path):
    rows = [{"prompt": f"What is {i} + {i}?", "answer": 2 * i} for i in range(20)]  # JSON numbers: read as text
    path = tmp_path / "user.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_user_task_splits_are_disjoint_and_deterministic(user_file, tmp_path):
    config = TaskConfig(kind="user", path=str(user_file), num_train=30, num_eval=5)
    task = make_task(config, seed=7)
    train, held_out = task.prompts("train"), task.prompts("eval")
    assert task.name == "user" and train.num_rows == 30 and held_out.num_rows == 5  # train cycles over 15 rows
    assert not set(train[schema.PROMPT].to_pylist()) & set(held_out[schema.PROMPT].to_pylist())
    assert make_task(config, seed=7).prompts("eval").equals(held_out)
    assert train[schema.ANSWER].type == pa.string()

    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps({"prompt": "What is 3 + 3?", "answer": "6"}) + "\n")
    task = make_task(config, DataConfig(eval=str(eval_file)))
    assert task.prompts("eval")[schema.PROMPT].to_pylist() == ["What is 3 + 3?"]
    assert "What is 3 + 3?" not in task.prompts("train")[schema.PROMPT].to_pylist()


def test_user_task_exact_match(user_file, tmp_path):
    task = make_task(TaskConfig(kind="user", name="qa", path=str(user_file), num_eval=2))
    assert task.name == "qa"
    assert task.score("The answer is 14.", "14", None) == 1.0
    assert task.score("15", "14", None) == 0.0
    assert task.score("answer:  Paris ", "Paris", None) == 1.0
    assert task.score("answer: paris", "Paris", None) == 0.0  # case matters unless ignore_case
    assert task.score("New  York\tCity", "New York City", None) == 1.0  # whitespace is normalised
    loose = make_task(TaskConfig(kind="user", path=str(user_file), args={"ignore_case": True}))
    row = {"verifier": "exact", "ignore_case": True}
    assert loose.score("answer: paris", "Paris", json.dumps(row)) == 1.0
    assert exact_score("0.5", "\\frac{1}{2}") == 0.0  # exact is exact


def test_user_task_math_verify(user_file):
    task = make_task(TaskConfig(kind="user", verifier="math", path=str(user_file), num_eval=2))
    meta = task.prompts("train", 1)[schema.METADATA][0].as_py()
    assert json.loads(meta)["verifier"] == "math"
    assert task.score("\\frac{1}{2}", "0.5", meta) == 1.0
    assert task.score("The answer is $\\boxed{\\frac12}$.", "0.5", meta) == 1.0
    assert task.score("Answer: 1/2", "0.5", meta) == 1.0
    assert task.score("0.5", "\\frac{1}{2}", meta) == 1.0
    assert task.score("x + 1", "1 + x", meta) == 1.0
    assert task.score("0.6", "0.5", meta) == 0.0
    assert task.score("I do not know", "0.5", meta) == 0.0


def test_math_verify_runs_outside_the_main_thread():
    """math-verify's default signal.alarm timeouts raise off the main thread; ours are disabled."""
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(math_score, "\\frac{1}{2}", "0.5").result() == 1.0


def test_user_task_refuses_bad_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match="needs columns 'prompt' and 'answer'"):
        UserTask(path=str(bad)).prompts("train")
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "q", "answer": ""}) + "\n")
    with pytest.raises(DataError, match="row 1, column 'answer'"):
        UserTask(path=str(empty)).prompts("train")
    with pytest.raises(ValueError, match="task.path"):
        make_task(TaskConfig(kind="user")).prompts("train")
    with pytest.raises(ValueError, match="unknown"):
        make_task(TaskConfig(kind="user", args={"pth": "x"}))


# ---------------------------------------------------------------- Ray scoring with timeouts


@dataclass
class MisbehavingTask:
    """Test-only verifier: `hang` sleeps far past the timeout, `boom` raises, `nan` returns NaN, else 0.75."""

    name: str = "misbehaving"

    def prompts(self, split, n=None):
        raise NotImplementedError

    def score(self, response, answer, metadata):
        if response == "hang":
            time.sleep(60)
        if response == "spin":
            while True:
                pass
        if response == "boom":
            raise RuntimeError("verifier bug")
        if response == "nan":
            return float("nan")
        return 0.75


@dataclass
class NoisyTask:
    """Test-only verifier whose full credit carries float noise: ten tenths sum to 0.9999999999999999."""

    name: str = "noisy"

    def prompts(self, split, n=None):
        raise NotImplementedError

    def score(self, response, answer, metadata):
        return sum([0.1] * 10) if response == "noisy" else float(response == answer)


# Ray workers cannot import this test module: ship the class by value.
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_score_chunk_counts_errors_and_timeouts_without_ray():
    rows = [(r, "", None) for r in ("ok", "boom", "hang", "ok", "nan", "spin", "ok")]
    start = time.monotonic()
    rewards, errors, timeouts, messages = score_chunk(MisbehavingTask(), rows, timeout_s=0.3)
    assert time.monotonic() - start < 5
    assert rewards == [0.75, 0.0, 0.0, 0.75, 0.0, 0.0, 0.75]
    assert (errors, timeouts) == (2, 2)
    assert "RuntimeError: verifier bug" in messages[0]


def test_score_rows_in_ray_counts_failures_and_never_hangs(ray_cluster):
    responses = ["ok", "hang", "boom", "ok"] * 3 + ["spin", None]
    table = pa.table({schema.RESPONSE: responses, schema.ANSWER: ["1"] * len(responses)})
    start = time.monotonic()
    rewards, failures = score_rows(table, TaskConfig(verifier_timeout_s=0.5), task=MisbehavingTask(), chunk_rows=7)
    assert time.monotonic() - start < 30  # mostly Ray worker start-up; a hang would be 60 s ('hang') or for ever
    assert failures == {"errors": 3, "timeouts": 4}
    assert rewards == [0.75, 0.0, 0.0, 0.75] * 3 + [0.0, 0.75]
    assert threading.active_count() < 50


def test_score_rows_real_tasks_in_ray(ray_cluster, tmp_path):
    task = tiny_task("basic_arithmetic")
    prompts = task.prompts("eval")
    answers = prompts[schema.ANSWER].to_pylist()
    responses = [f"The answer is {a}." if i % 2 == 0 else wrong_answer(a) for i, a in enumerate(answers)]
    table = schema.append_column(prompts, schema.RESPONSE, responses)
    write_table(table, tmp_path / "rollouts.parquet")
    table = read_table(tmp_path / "rollouts.parquet")
    config = TaskConfig(args=TINY_ARGS["basic_arithmetic"])
    rewards, failures = score_rows(table, config, chunk_rows=5)
    assert failures == {"errors": 0, "timeouts": 0}
    assert rewards == [1.0 if i % 2 == 0 else 0.0 for i in range(len(answers))]
    assert score_rows(table.slice(0, 0), config) == ([], {"errors": 0, "timeouts": 0})


def test_verifier_float_noise_is_kept_and_never_correct(ray_cluster, tmp_path):
    """The verifier's value is stored exactly (float64) and correct means reward >= threshold, with no slack."""
    table = pa.table({schema.RESPONSE: ["1", "noisy", "0"], schema.ANSWER: ["1"] * 3, schema.GROUP_ID: [0, 0, 0]})
    rewards, _ = score_rows(table, TaskConfig(), task=NoisyTask())
    assert rewards == [1.0, sum([0.1] * 10), 0.0] and rewards[1] < 1.0
    write_table(schema.append_column(table, schema.REWARD, rewards), tmp_path / "scored.parquet")
    scored = read_table(tmp_path / "scored.parquet")
    assert scored[schema.REWARD].to_pylist() == rewards
    assert correct_mask(scored, threshold=1.0).tolist() == [True, False, False]
    assert correct_counts(scored, threshold=1.0).tolist() == [1]
    assert correct_counts(scored, threshold=0.5).tolist() == [2]
