"""The calculator tool world: the environment's answers and rewards, the tool-using scripted policy's multi-turn
trajectories (token-exact, with exact behaviour log-probs on the policy's tokens only), and the config's refusal of
an environment nobody registered."""

import json
import math

import numpy as np
import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from pear_ray.config import ConfigError, ScriptedPolicy, TaskConfig, parse_job
from pear_ray.data import schema
from pear_ray.data.io import encode_response
from pear_ray.environments import ENVIRONMENTS, observation_ids
from pear_ray.environments.base import ENV_ERROR, ENV_TIMEOUT
from pear_ray.environments.calculator import DIRECT, TOOL, CalculatorEnv, evaluate
from pear_ray.stages.common import decoded_rewards
from pear_ray.tasks import AdditionTask, make_task
from pear_ray.tasks.addition import BARE, scripted_rows


@pytest.mark.parametrize(("expression", "value"), [("345+678", "1023"), (" 12 * 3 ", "36"), ("5-9", "-4"),
                                                   ("1+2+3", "error"), ("x", "error"), ("1" * 13 + "+1", "error")])
def test_the_calculator_takes_two_integers_and_one_operator(expression, value):
    assert evaluate(expression) == value


def test_an_episode_answers_calls_and_rewards_the_first_turn_without_one():
    env = CalculatorEnv(AdditionTask())
    assert env.reset(seed=0, options={"row": {"answer": "1023", "metadata": None}}) == ("", {})
    assert env.step("let me <calc>345+678</calc>")[:4] == ("1023", 0.0, False, False)
    assert env.step("<calc>nonsense</calc>")[:4] == ("error", 0.0, False, False)
    observation, reward, terminated, truncated, info = env.step("Answer: 1023")
    assert (observation, reward, terminated, truncated, info["calls"]) == ("", 1.0, True, False, 2)
    env.reset(options={"row": {"answer": "1023", "metadata": None}})
    assert env.step("Answer: 1024")[1:3] == (0.0, True)


def test_a_job_with_an_environment_plays_episodes_and_reports_tool_calls():
    task = make_task(TaskConfig(kind="addition", environment={"kind": "calculator"}))
    assert task.styles == (TOOL, DIRECT)
    assert task.style("<calc>1+2</calc>tool\n3\nassistant\nAnswer: 3") == TOOL and task.style("Answer: 3") == DIRECT
    assert isinstance(task.environment()(), CalculatorEnv)


def test_an_unregistered_environment_is_refused_naming_the_key():
    assert "calculator" in ENVIRONMENTS
    with pytest.raises(ConfigError, match=r"task\.environment\.kind.*unknown environment kind 'abacus'"):
        parse_job({"name": "x", "task": {"kind": "addition", "environment": {"kind": "abacus"}}})


def test_tool_using_trajectories_are_token_exact_with_exact_logprobs_on_policy_tokens(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = AdditionTask(num_train=100, num_eval=4).prompts("train")
    rows = scripted_rows(prompts, tokenizer, ScriptedPolicy(name="tool_use", p_tool=0.3), seed=0, samples_per_prompt=2,
                         topk=2)
    # empty top-k lists at the environment's tokens are right: they are not the policy's actions
    schema.validate(rows, required=(schema.RESPONSE_IDS,), vocab_size=len(tokenizer))
    sources = np.array(rows.column(schema.SOURCE).to_pylist())
    assert 0.2 < np.mean(sources == TOOL) < 0.4
    for row in rows.to_pylist():
        ids, mask, logprobs = row[schema.RESPONSE_IDS], row[schema.POLICY_MASK], row[schema.BEHAVIOR_LOGPROBS]
        answer = row[schema.ANSWER]
        if row[schema.SOURCE] == BARE:
            assert ids == encode_response(tokenizer, f"Answer: {answer}") and all(mask)
            assert logprobs[0] == pytest.approx(math.log(0.7)) and logprobs[1:] == [0.0] * (len(ids) - 1)
            continue
        meta = json.loads(row[schema.METADATA])
        a, b = meta["a"], meta["b"]
        call = encode_response(tokenizer, f"<calc>{a}+{b}</calc>")
        tool = observation_ids(tokenizer, answer)
        final = encode_response(tokenizer, f"Answer: {answer}")
        assert ids == call + tool + final  # each turn's ids as written, appended: nothing re-tokenized
        assert mask == [True] * len(call) + [False] * len(tool) + [True] * len(final)
        assert logprobs[0] == pytest.approx(math.log(0.3)) and logprobs[1:] == [0.0] * (len(ids) - 1)
        assert [len(top) for top in row[schema.TEACHER_TOPK]] == [2] + [1] * (len(call) - 1) + [0] * len(tool) + \
            [1] * len(final)  # the style's choice, then one certain token at each policy token, none for the tool
        assert tokenizer.decode(tool).startswith("<|im_start|>tool\n" + answer)
        assert row[schema.RESPONSE] == tokenizer.decode(ids, skip_special_tokens=True)
        assert make_task(TaskConfig(kind="addition", environment={"kind": "calculator"})).style(
            row[schema.RESPONSE]) == TOOL


def test_the_tool_using_policy_without_a_calculator_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"models\.behavior\.scripted: tool_use calls the calculator"):
        parse_job({"name": "x", "task": {"kind": "addition"},
                   "models": {"student": {"tiny": {}}, "behavior": {"scripted": {"name": "tool_use"}}}})


def test_episodes_keep_their_environments_reward_and_its_failures_are_counted(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    task = make_task(TaskConfig(kind="addition", environment={"kind": "calculator"}))
    episodes = pa.table({
        schema.RESPONSE_IDS: [tokenizer.encode("Answer: 7"), tokenizer.encode("<calc>1+2</calc>"), [5], [6]],
        schema.ANSWER: ["7", "3", "1", "1"],
        schema.REWARD: pa.array([1.0, 0.0, 0.0, 0.0], pa.float64()),
        schema.FINISH_REASON: ["stop", "length", ENV_ERROR, ENV_TIMEOUT]})
    scored, failures = decoded_rewards(episodes, tokenizer, task, TaskConfig(kind="addition"))
    assert scored.column(schema.REWARD).to_pylist() == [1.0, 0.0, 0.0, 0.0]  # the environment's, not re-verified
    assert scored.column(schema.RESPONSE).to_pylist()[:2] == ["Answer: 7", "<calc>1+2</calc>"]
    assert failures == {"errors": 0, "timeouts": 0, "env_errors": 1, "env_timeouts": 1}
