"""The experiment's task and scripted behaviour policy: splits, traces, and behaviour log-probs that are exact."""

import json
import math
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from pear_ray.config import ScriptedPolicy, TaskConfig, parse_job
from pear_ray.data import schema
from pear_ray.data.io import encode_prompt, encode_response
from pear_ray.stages.common import Run
from pear_ray.stages.score import run_score
from pear_ray.tasks import make_task
from pear_ray.tasks.addition import (
    BARE,
    TRACE,
    AdditionTask,
    bare_text,
    exact_logprobs,
    exact_topk,
    scripted_rows,
    trace_text,
)
from pear_ray.tracking import MetricsLogger


def test_splits_are_disjoint_and_a_longer_train_split_extends_a_shorter_one():
    task = AdditionTask(digits=3, num_train=50, num_eval=40, seed=7)
    eval_prompts = set(task.prompts("eval").column("prompt").to_pylist())
    train = task.prompts("train").column("prompt").to_pylist()
    longer = task.prompts("train", 80).column("prompt").to_pylist()
    assert len(eval_prompts) == 40 and len(set(longer)) == 80
    assert not eval_prompts & set(longer)
    assert longer[:50] == train  # a prior's prompts (rows 50..79) are outside train and eval
    assert AdditionTask(digits=3, num_train=50, num_eval=40, seed=8).prompts("eval").column("prompt").to_pylist() \
        != task.prompts("eval").column("prompt").to_pylist()


@pytest.mark.parametrize("a,b", [(345, 678), (999, 1), (100, 100), (7, 5)])
def test_a_trace_adds_digit_by_digit_and_ends_with_the_sum(a, b):
    text = trace_text(a, b)
    carry, digits = 0, []
    for step in re.findall(r"(\d)\+(\d)(?:\+(\d))?=(\d+)", text):
        x, y, c, total = int(step[0]), int(step[1]), int(step[2] or 0), int(step[3])
        assert c == carry and total == x + y + c
        digits.append(total % 10)
        carry = total // 10
    written = int((str(carry) if carry else "") + "".join(map(str, reversed(digits))))
    assert written == a + b and text.endswith(f"Answer: {a + b}")
    assert AdditionTask().score(text, str(a + b)) == 1.0
    assert AdditionTask().score(text.replace(f"Answer: {a + b}", f"Answer: {a + b + 1}"), str(a + b)) == 0.0


def test_make_task_builds_addition_and_refuses_unknown_args():
    task = make_task(TaskConfig(kind="addition", args={"digits": 2}, num_train=4, num_eval=3))
    assert all(len(q.split()[2]) == 2 for q in task.prompts("eval").column("prompt").to_pylist())
    with pytest.raises(ValueError, match="unknown \\['digitz'\\]"):
        make_task(TaskConfig(kind="addition", args={"digitz": 2}))


def test_exact_logprobs_of_a_mixture_with_shared_prefixes():
    candidates = [[5, 6, 7, 0], [5, 6, 8, 0], [9, 0]]
    probs = [0.2, 0.3, 0.5]
    for chosen, p in enumerate(probs):
        lp = exact_logprobs(candidates, probs, chosen)
        assert math.isclose(sum(lp), math.log(p), abs_tol=1e-12)  # the chain rule gives the whole response
    assert exact_logprobs(candidates, probs, 0) == pytest.approx([math.log(0.5), 0.0, math.log(0.4), 0.0])
    assert exact_logprobs(candidates, probs, 2) == pytest.approx([math.log(0.5), 0.0])


def test_scripted_rows_carry_exact_behaviour_logprobs_and_their_style(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    task = AdditionTask(num_train=200, num_eval=4)
    prompts = task.prompts("train")
    prompts = schema.append_column(prompts, schema.PROMPT_IDS,
                                   [encode_prompt(tokenizer, t) for t in prompts.column("prompt").to_pylist()])
    rows = scripted_rows(prompts, tokenizer, ScriptedPolicy(p_trace=0.3), seed=0, samples_per_prompt=2)
    assert rows.num_rows == 400
    sources = np.array(rows.column(schema.SOURCE).to_pylist())
    assert 0.22 < np.mean(sources == TRACE) < 0.38
    for text, ids, lp, source in zip(*(rows.column(c).to_pylist() for c in (
            schema.RESPONSE, schema.RESPONSE_IDS, schema.BEHAVIOR_LOGPROBS, schema.SOURCE))):
        assert ids == encode_response(tokenizer, text) and len(lp) == len(ids)
        assert lp[0] == pytest.approx(math.log(0.3 if source == TRACE else 0.7), abs=1e-6)
        assert lp[1:] == [0.0] * (len(lp) - 1)  # the style fixes every later token
        assert text.startswith("Work:") == (source == TRACE) and (source == BARE) == text.startswith("Answer:")
    schema.validate(rows, vocab_size=len(tokenizer))


def test_exact_topk_is_the_mixtures_next_token_distribution():
    candidates = [[5, 6, 7, 0], [5, 6, 8, 0], [9, 0]]
    probs = [0.1, 0.3, 0.6]
    for chosen in range(len(candidates)):
        full = exact_topk(candidates, probs, chosen, k=10)
        assert len(full) == len(candidates[chosen])
        for t, position in enumerate(full):
            assert math.isclose(sum(math.exp(lp) for _, lp in position), 1.0, abs_tol=1e-12)
            assert [lp for _, lp in position] == sorted((lp for _, lp in position), reverse=True)
            assert dict(position)[candidates[chosen][t]] == exact_logprobs(candidates, probs, chosen)[t]
    [(best, best_lp), (other, other_lp)] = exact_topk(candidates, probs, 0, k=10)[2]  # after [5, 6]: 8 or 7
    assert (best, other) == (8, 7) and (best_lp, other_lp) == pytest.approx((math.log(0.75), math.log(0.25)))
    truncated = exact_topk(candidates, probs, 0, k=1)
    assert [[token for token, _ in position] for position in truncated] == [[9], [6], [8], [0]]  # the best only


def test_scripted_rows_carry_the_policys_exact_topk(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = AdditionTask(num_train=20, num_eval=4).prompts("train")
    prompts = schema.append_column(prompts, schema.PROMPT_IDS,
                                   [encode_prompt(tokenizer, t) for t in prompts.column("prompt").to_pylist()])
    rows = schema.validate(scripted_rows(prompts, tokenizer, ScriptedPolicy(p_trace=0.5), seed=0, topk=4),
                           vocab_size=len(tokenizer))
    sources = set()
    for row in rows.to_pylist():
        meta = json.loads(row[schema.METADATA])
        starts = {encode_response(tokenizer, text(meta["a"], meta["b"]))[0] for text in (trace_text, bare_text)}
        first, *later = row[schema.TEACHER_TOPK]
        assert {e["id"] for e in first} == starts and len(starts) == 2  # the style's choice: trace or bare start
        assert [e["logprob"] for e in first] == pytest.approx([math.log(0.5)] * 2)
        assert [[(e["id"], e["logprob"]) for e in token] for token in later] == \
            [[(token, 0.0)] for token in row[schema.RESPONSE_IDS][1:]]  # the style fixes every later token
        sources.add(row[schema.SOURCE])
    assert sources == {TRACE, BARE}
    policy = ScriptedPolicy(p_trace=0.5)
    assert schema.TEACHER_TOPK not in scripted_rows(prompts, tokenizer, policy, seed=0).column_names


def test_the_score_stage_writes_the_scripted_policys_topk(tiny_model_dir, tmp_path):
    job = parse_job({"name": "topk", "models": {"student": {"path": str(tiny_model_dir)},
                                                "behavior": {"scripted": {"p_trace": 0.3}}},
                     "task": {"kind": "addition", "num_train": 12, "num_eval": 2},
                     "score": {"teacher_topk": 4, "samples_per_prompt": 2}})
    with MetricsLogger(tmp_path, resume=False, loggers=()) as metrics:
        path = run_score(Run(job, tmp_path, metrics, tiny_model_dir))
    data = schema.validate(pq.read_table(path), vocab_size=len(AutoTokenizer.from_pretrained(tiny_model_dir)))
    assert data.num_rows == 24 and data.schema.field(schema.TEACHER_TOPK).type == schema.TOPK_TYPE
    for topk, logprobs, source in zip(*(data.column(c).to_pylist() for c in (
            schema.TEACHER_TOPK, schema.BEHAVIOR_LOGPROBS, schema.SOURCE))):
        assert sorted(e["logprob"] for e in topk[0]) == pytest.approx([math.log(0.3), math.log(0.7)])
        assert logprobs[0] == pytest.approx(math.log(0.3 if source == TRACE else 0.7))
