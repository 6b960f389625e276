"""Response styles: the addition task tells a worked trace from a bare answer, and eval counts them per prompt."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pear_ray.data import schema
from pear_ray.stages.common import style_counts, style_shares
from pear_ray.stages.evaluate import write_per_prompt
from pear_ray.tasks import AdditionTask, CustomReward, ReasoningGymTask, UserTask
from pear_ray.tasks.addition import BARE, TRACE, bare_text, response_style, trace_text
from pear_ray.tasks.base import StyledTask, task_styles


@pytest.mark.parametrize("text, style", [
    (trace_text(345, 678), TRACE),
    (bare_text(345, 678), BARE),
    ("Work: 5+8=13", TRACE),  # cut short: still written as a trace
    ("Answer: 12 Work: 1+1=2", BARE),  # the opening decides
    (" \n\tWork:1+2=3", TRACE),  # leading whitespace ignored
    ("  Answer:", BARE),
    ("The answer is 1023", None),
    ("Work 5+8=13", None),  # no colon
    ("answer: 1023", None),  # case matters
    ("1023 Answer: 1023", None),
    ("", None),
    ("\n", None),
])
def test_a_response_is_a_trace_a_bare_answer_or_neither(text, style):
    assert response_style(text) == style
    assert AdditionTask().style(text) == style


def test_addition_has_styles_other_tasks_none_and_a_custom_reward_keeps_its_tasks():
    assert task_styles(AdditionTask()) == (TRACE, BARE) == ("trace", "bare")
    assert isinstance(AdditionTask(), StyledTask)
    assert task_styles(ReasoningGymTask()) == () and task_styles(UserTask(path="x.jsonl")) == ()
    rewarded = CustomReward(AdditionTask(), "reward.py:length_reward")
    assert task_styles(rewarded) == (TRACE, BARE) and rewarded.style(" Work: 1+1=2 Answer: 2") == TRACE
    assert task_styles(CustomReward(ReasoningGymTask(), "reward.py:length_reward")) == ()


def responses(groups: list[int], texts: list[str]) -> pa.Table:
    return pa.table({schema.GROUP_ID: pa.array(groups, pa.int64()), schema.RESPONSE: texts})


def test_style_counts_per_prompt_in_group_order_whatever_order_the_samples_came_in():
    trace, bare = trace_text(12, 34), bare_text(12, 34)
    table = responses([2, 2, 2, 0, 0, 0, 1, 1, 1],
                      [trace, bare, "junk", bare, bare, bare, trace, " " + trace, "Work: 1+2=3"])
    counts = style_counts(table, AdditionTask())
    assert list(counts) == [TRACE, BARE]  # the task's order
    assert counts[TRACE].tolist() == [0, 3, 1] and counts[BARE].tolist() == [3, 0, 1]
    assert style_shares(counts, table.num_rows) == {"share_trace": 4 / 9, "share_bare": 4 / 9}
    assert style_shares({TRACE: 4, BARE: 4}, 9) == {"share_trace": 4 / 9, "share_bare": 4 / 9}  # totals alike


def test_a_task_without_styles_counts_nothing():
    table = responses([0, 0], ["Work: 1+1=2", "Answer: 2"])
    assert style_counts(table, ReasoningGymTask()) == {} and style_shares({}, 2) == {}


def test_the_per_prompt_parquet_has_an_int32_count_per_style_next_to_n(tmp_path):
    prompts = AdditionTask(num_eval=3).prompts("eval")
    styles = {TRACE: np.array([2, 0, 1]), BARE: np.array([0, 2, 0])}
    write_per_prompt(tmp_path / "with.parquet", prompts, np.array([1, 2, 0]), n=2, stage="sft", variant="token",
                     seed=5, styles=styles)
    table = pq.read_table(tmp_path / "with.parquet")
    assert table.column_names == ["prompt_id", "n", "correct", "style_trace", "style_bare", "stage", "variant", "seed"]
    assert table.schema.field("style_trace").type == pa.int32() == table.schema.field("style_bare").type
    assert table.column("style_trace").to_pylist() == [2, 0, 1] and table.column("style_bare").to_pylist() == [0, 2, 0]
    write_per_prompt(tmp_path / "without.parquet", prompts, np.array([1, 2, 0]), n=2, stage="sft", variant="token",
                     seed=5)
    assert pq.read_table(tmp_path / "without.parquet").column_names == ["prompt_id", "n", "correct", "stage",
                                                                         "variant", "seed"]
