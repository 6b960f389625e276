"""Rewards from a model, the pure parts: the judge's template and answer, the classifier's sigmoid, the combined
reward by hand; and the bad reward models refused when the job loads or at preflight, naming the key."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from pear_ray.cli import app
from pear_ray.config import TaskConfig
from pear_ray.data import schema
from pear_ray.models import TinyModelSpec, build_tiny_model
from pear_ray.rewards import (
    build_tiny_classifier,
    check_template,
    combined_reward,
    folder_kind_problem,
    parse_judge_score,
    render_template,
    sigmoid,
)
from pear_ray.stages.rl_batch import with_combined_reward

SMOKE = str(Path(__file__).resolve().parents[2] / "jobs" / "smoke.yaml")
runner = CliRunner()
SCORE = r"Score: (\d+(?:\.\d+)?)"


@pytest.mark.parametrize(("text", "score"), [
    ("Score: 7", 0.7),
    ("I would say... Score: 10/10", 1.0),
    ("Score: 3.5 out of 10", 0.35),
    ("Score: 0", 0.0),
    ("Score: 12", 1.0),  # above max_score: clamped
    ("Score: 4 then Score: 9", 0.4),  # the first match
])
def test_a_judge_answer_is_read_as_its_first_number_over_max_score(text, score):
    assert parse_judge_score(text, SCORE, 10.0) == pytest.approx(score, abs=1e-12)


@pytest.mark.parametrize("text", ["no score here", "Score: high", "", "score: 7"])
def test_an_answer_without_the_pattern_is_unparsed(text):
    assert parse_judge_score(text, SCORE, 10.0) is None


def test_the_default_pattern_reads_a_signed_number_and_clamps_below_zero():
    assert parse_judge_score("grade -3 of 5", r"(-?\d+(?:\.\d+)?)", 5.0) == 0.0
    assert parse_judge_score("grade 4 of 5", re.compile(r"(-?\d+(?:\.\d+)?)"), 5.0) == pytest.approx(0.8)
    assert parse_judge_score("inf", r"(\w+)", 5.0) is None  # float('inf') parses, but is no mark


def test_the_template_is_filled_with_the_sample_and_literal_braces_stay():
    template = check_template("Q: {prompt}\nA: {response}\nGold: {answer}\nReply as {{score}}.")
    assert render_template(template, response="4", prompt="2+2?", answer="4") == \
        "Q: 2+2?\nA: 4\nGold: 4\nReply as {score}."


@pytest.mark.parametrize(("template", "message"), [
    ("Rate this answer.", "must name {response}"),
    ("Rate {response} to {question}", "names {question}"),
    ("Rate {response} {0}", "names {0}"),
    ("Rate {response", "does not parse"),
])
def test_a_bad_template_is_refused(template, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_template(template)


def test_sigmoid_of_logits():
    assert sigmoid(np.array([0.0, np.log(3.0), -np.log(3.0), 800.0, -800.0])).tolist() == pytest.approx(
        [0.5, 0.75, 0.25, 1.0, 0.0], abs=1e-15)


def test_the_combined_reward_by_hand():
    verifier = np.array([1.0, 0.0, 1.0])
    scores = {"helpful": np.array([0.5, 0.25, 0.0]), "judge": np.array([0.1, 0.9, 0.4])}
    got = combined_reward(verifier, scores, 0.5, {"helpful": 2.0, "judge": -1.0})
    assert got.tolist() == pytest.approx([0.5 + 1.0 - 0.1, 0.0 + 0.5 - 0.9, 0.5 + 0.0 - 0.4], abs=1e-15)


def test_rl_trains_on_the_combined_reward_and_keeps_the_verifiers():
    task = TaskConfig(kind="addition", verifier_weight=2.0, reward_models=[
        {"kind": "classifier", "name": "c", "tiny": {}, "weight": 0.5}])
    table = pa.table({schema.REWARD: [1.0, 0.0], "reward_c": [0.25, 0.75]})
    out = with_combined_reward(table, task)
    assert out.column(schema.REWARD).to_pylist() == [2.0 + 0.125, 0.375]
    assert out.column("verifier_reward").to_pylist() == [1.0, 0.0]


# ---------------------------------------------------------------- refused before anything starts


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """A classifier, a causal LM, and a causal LM whose config claims a classification head its weights lack."""
    folder = tmp_path_factory.mktemp("reward-models")
    build_tiny_classifier(TinyModelSpec(), folder / "classifier")
    build_tiny_model(TinyModelSpec(), folder / "causal")
    shutil.copytree(folder / "causal", folder / "headless")
    config = json.loads((folder / "headless" / "config.json").read_text())
    config.update(architectures=["Qwen2ForSequenceClassification"], id2label={"0": "LABEL_0"},
                  label2id={"LABEL_0": 0})
    (folder / "headless" / "config.json").write_text(json.dumps(config))
    return folder


def error_of(*overrides: str) -> str:
    result = runner.invoke(app, ["config", SMOKE, *overrides])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("error: "))
    return "\n".join(lines[start:])


def reward_models(*entries: str) -> str:
    return f"task.reward_models=[{', '.join(entries)}]"


def test_the_folders_are_what_their_kind_loads(folders):
    assert folder_kind_problem(folders / "classifier", "classifier") is None
    assert folder_kind_problem(folders / "causal", "judge") is None


@pytest.mark.parametrize(("entry", "where", "what"), [
    ("{kind: judge, name: j, tiny: {}, template: 'Rate it'}", "task.reward_models.0.judge.template",
     "must name {response}"),
    ("{kind: judge, name: j, tiny: {}, template: 'Rate {response} by {rubric}'}", "task.reward_models.0.judge.template",
     "names {rubric}"),
    ("{kind: judge, name: j, tiny: {}, template: '{response}', score_pattern: '\\d+'}",
     "task.reward_models.0.judge.score_pattern", "has no group"),
    ("{kind: oracle, name: o, tiny: {}}", "task.reward_models.0", "oracle"),
    ("{kind: classifier, name: c}", "task.reward_models.0.classifier", "exactly one of 'path'"),
])
def test_a_bad_reward_model_is_refused_when_the_job_loads(entry, where, what):
    line = error_of(reward_models(entry))
    assert where in line and what in line, line


def test_two_reward_models_of_one_name_are_refused():
    line = error_of(reward_models("{kind: classifier, name: c, tiny: {}}", "{kind: classifier, name: c, tiny: {}}"))
    assert "task.reward_models" in line and "['c'] given more than once" in line, line


@pytest.mark.parametrize(("kind", "folder", "what"), [
    ("classifier", "causal", "not a sequence-classification model: config.json's architectures are "
                             "['Qwen2ForCausalLM']"),
    ("classifier", "headless", "the weights lack its classification head"),
    ("judge", "classifier", "must be a causal LM; config.json's architectures are "
                            "['Qwen2ForSequenceClassification']"),
])
def test_a_folder_not_of_its_kind_is_refused_at_preflight(folders, kind, folder, what):
    template = ", template: '{response}'" if kind == "judge" else ""
    line = error_of(reward_models(f"{{kind: {kind}, name: m, path: {folders / folder}{template}}}"))
    assert f"task.reward_models.0.path = '{folders / folder}' ({kind} 'm')" in line and what in line, line
