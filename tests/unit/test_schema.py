"""The Arrow data plane: bad batches are refused naming file, row and column; padding round-trips."""

import copy
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pear_ray.data import schema
from pear_ray.data.io import DataError, read_table, tokenize, write_table
from pear_ray.data.tensors import from_tensor, to_tensors


def make_batch(**overrides):
    columns = {
        "id": ["a", "b", "c"],
        "prompt_ids": [[1, 2], [3], [4, 5, 6]],
        "response_ids": [[7, 8, 9], [10], [11, 12]],
        "behavior_logprobs": [[-0.1, -0.2, -0.3], [-1.0], [-0.5, -0.6]],
        "reward": [1.0, 0.0, 0.5],
    }
    columns.update(overrides)
    return pa.table(columns)


def entries(*pairs):
    return [{"id": token, "logprob": logprob} for token, logprob in pairs]


# A teacher_topk for make_batch's responses (3, 1 and 2 tokens): per token, (id, log-prob) entries, best first.
TOPK = [[entries((7, -0.1), (3, -2.5)), entries((8, -0.2)), entries((9, -0.3), (1, -1.4))],
        [entries((10, -1.0))],
        [entries((11, -0.5)), entries((12, -0.6), (0, -0.9), (5, -3.0))]]


def topk_with(row, token, value):
    """TOPK with one token's entries replaced (value None: the token removed)."""
    topk = copy.deepcopy(TOPK)
    if value is None:
        del topk[row][token]
    else:
        topk[row][token] = value
    return topk


def test_a_good_batch_is_conformed_to_schema_types():
    table = schema.validate(make_batch(), vocab_size=16)
    assert table.schema.field("prompt_ids").type == pa.list_(pa.int32())
    assert table.schema.field("behavior_logprobs").type == pa.list_(pa.float32())
    assert table.schema.field("reward").type == pa.float64()  # the verifier's exact value


def test_missing_column_is_named():
    with pytest.raises(schema.SchemaError, match="column 'response_ids': missing"):
        schema.validate(make_batch().drop(["response_ids"]))


@pytest.mark.parametrize(
    ("overrides", "column", "row", "message"),
    [
        ({"behavior_logprobs": [[-0.1, -0.2, -0.3], [-1.0, -2.0], [-0.5, -0.6]]}, "behavior_logprobs", 1,
         "has 2 values but response_ids has 1 tokens"),
        ({"behavior_logprobs": [[-0.1, -0.2, -0.3], [-1.0], [-0.5, math.nan]]}, "behavior_logprobs", 2,
         "value nan at response token 1 is not a log-probability"),
        ({"behavior_logprobs": [[-0.1, 0.5, -0.3], [-1.0], [-0.5, -0.6]]}, "behavior_logprobs", 0,
         "value 0.5 at response token 1"),
        ({"response_ids": [[7, 8, 9], [10], [11, 99]]}, "response_ids", 2,
         "token id 99 is outside the vocabulary [0, 16)"),
        ({"prompt_ids": [[1, 2], [-3], [4, 5, 6]]}, "prompt_ids", 1, "token id -3"),
        ({"response_ids": [[7, 8, 9], [], [11, 12]], "behavior_logprobs": [[-0.1, -0.2, -0.3], [], [-0.5, -0.6]]},
         "response_ids", 1, "is empty"),
        ({"prompt_ids": [[1, 2], [3], None]}, "prompt_ids", 2, "is null"),
        ({"reward": [1.0, math.inf, 0.5]}, "reward", 1, "value inf is not finite"),
        ({"teacher_topk": topk_with(2, 1, None)}, "teacher_topk", 2, "has 1 values but response_ids has 2 tokens"),
        ({"teacher_topk": topk_with(2, 1, entries((12, -0.6), (99, -0.9)))}, "teacher_topk", 2,
         "id 99 at response token 1 is outside the vocabulary [0, 16)"),
        ({"teacher_topk": topk_with(0, 2, entries((9, 0.5)))}, "teacher_topk", 0,
         "log-prob 0.5 at response token 2 is not a log-probability"),
        ({"teacher_topk": topk_with(0, 1, entries((8, -math.inf)))}, "teacher_topk", 0,
         "log-prob -inf at response token 1 is not a log-probability"),
        ({"teacher_topk": topk_with(1, 0, [])}, "teacher_topk", 1, "has no entries at response token 0"),
        ({"policy_mask": [[True, False, True], [True, False], [True, True]]}, "policy_mask", 1,
         "has 2 values but response_ids has 1 tokens"),
        ({"policy_mask": [[True, False, True], None, [True, True]]}, "policy_mask", 1, "is null"),
        ({"policy_mask": [[True, False, True], [True], [False, False]]}, "policy_mask", 2, "has no true value"),
        ({"policy_mask": [[True, False, True], [True], [True, None]]}, "policy_mask", 2,
         "is null at response token 1"),
        ({"policy_mask": [[True, True, False], [True], [True, True]], "teacher_topk": topk_with(0, 1, [])},
         "teacher_topk", 0, "has no entries at response token 1, which the policy wrote"),
    ],
)
def test_bad_batches_name_row_and_column(overrides, column, row, message):
    with pytest.raises(schema.SchemaError) as caught:
        schema.validate(make_batch(**overrides), vocab_size=16, source="data.parquet", row_offset=100)
    error = caught.value
    assert (error.column, error.row) == (column, 100 + row)
    assert str(error).startswith(f"data.parquet, column '{column}', row {100 + row + 1}: ")
    assert message in str(error)


# make_batch's responses (3, 1 and 2 tokens) as multi-turn trajectories: row 0's middle token is the environment's.
POLICY_MASK = [[True, False, True], [True], [False, True]]


def test_environment_tokens_may_have_no_teacher_topk_and_are_not_counted():
    topk = topk_with(0, 1, [])  # an environment token: no teacher entries
    topk[2][0] = []
    table = schema.validate(make_batch(policy_mask=POLICY_MASK, teacher_topk=topk), vocab_size=16)
    assert table.schema.field("policy_mask").type == pa.list_(pa.bool_())
    assert schema.response_token_count(table) == 4  # of 6 response tokens, 2 are the environment's
    assert schema.response_token_count(make_batch()) == 6  # no policy_mask: every response token is the policy's
    assert schema.policy_tokens(table).tolist() == [True, False, True, True, False, True]


def test_truncating_responses_cuts_the_policy_mask_with_them():
    table = make_batch(policy_mask=POLICY_MASK)
    cut = tokenize(table, tokenizer=None, max_prompt_tokens=8, max_response_tokens=2)  # ids given: no tokenizer
    assert cut.column("policy_mask").to_pylist() == [[True, False], [True], [False, True]]
    schema.validate(cut)


def test_teacher_topk_keeps_its_type_through_parquet(tmp_path):
    write_table(schema.validate(make_batch(teacher_topk=TOPK), vocab_size=16), tmp_path / "data.parquet")
    table = read_table(tmp_path / "data.parquet")
    assert table.schema.field("teacher_topk").type == schema.TOPK_TYPE
    assert table.column("teacher_topk").to_pylist() == [
        [[{"id": e["id"], "logprob": pytest.approx(e["logprob"])} for e in token] for token in row] for row in TOPK]


def test_uncastable_column_type_is_named():
    with pytest.raises(schema.SchemaError, match="column 'response_ids': has type list<item: string>"):
        schema.validate(make_batch(response_ids=[["x"], ["y"], ["z"]]))


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "1+1", "response": "2"}\n\n{"prompt": "2+2", "response": \n')
    with pytest.raises(DataError, match=r"data\.jsonl, line 3: not valid JSON"):
        read_table(path)
    path.write_text('["not", "an", "object"]\n')
    with pytest.raises(DataError, match="line 1: expected a JSON object, got list"):
        read_table(path)
    path.write_text('{"prompt_ids": [1], "response_ids": [2]}\n{"prompt_ids": "oops", "response_ids": [2]}\n')
    with pytest.raises(DataError, match=r"data\.jsonl, line 2, column 'prompt_ids': expected list<item: int32>, "
                                        "got str 'oops'"):
        read_table(path)


@pytest.mark.parametrize("line", [1, 2, 4])
def test_a_value_of_another_type_than_its_column_names_file_line_and_column(tmp_path, line):
    """The schema's type decides which line is wrong, so a wrong first line is named too, not the next good one."""
    rows = [json.dumps({"prompt_ids": [1, 2], "response_ids": [3, 4]})] * 3
    rows.insert(line - 1, json.dumps({"prompt_ids": "hello", "response_ids": [5, 6]}))
    rows.insert(2, "")  # blank lines are skipped but counted, as an editor counts them
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as caught:
        read_table(path)
    assert str(caught.value) == (f"{path}, line {line if line < 3 else line + 1}, column 'prompt_ids': expected "
                                 "list<item: int32>, got str 'hello'")


def test_a_column_the_schema_does_not_know_is_judged_by_the_lines_above(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": "1+1=", "response": "2", "tags": tags}) + "\n"
                            for tags in (["a"], ["b", "c"], 7, ["d"])))
    with pytest.raises(DataError, match=r"data\.jsonl, line 3, column 'tags': expected list<item: string>, as on the "
                                        "lines above, got int 7"):
        read_table(path)


def test_empty_or_corrupt_files_are_refused_naming_the_file(tmp_path):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "response": pa.array([], pa.string())}), empty)
    with pytest.raises(DataError, match=r"empty\.parquet: no rows"):
        read_table(empty)
    (tmp_path / "blank.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"blank\.jsonl: no rows"):
        read_table(tmp_path / "blank.jsonl")
    for name, content in (("zero.parquet", b""), ("junk.parquet", b"not parquet at all")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}: not a readable Parquet file"):
            read_table(tmp_path / name)


def test_jsonl_and_parquet_read_to_the_same_typed_table(tmp_path):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"prompt_ids": [1, 2], "response_ids": [3], "behavior_logprobs": [-0.5]}\n')
    from_jsonl = read_table(jsonl)
    write_table(from_jsonl, tmp_path / "data.parquet")
    from_parquet = read_table(tmp_path / "data.parquet")
    assert from_jsonl.equals(from_parquet)
    assert from_parquet.schema.field("prompt_ids").type == pa.list_(pa.int32())
    csv = tmp_path / "data.csv"
    csv.write_text("prompt,response\n")
    with pytest.raises(DataError, match="unknown format '.csv'"):
        read_table(csv)


def test_padding_lays_tokens_and_per_token_columns_on_one_grid():
    table = schema.validate(make_batch())
    tensors = to_tensors(table, pad_id=0, columns=("behavior_logprobs",))
    assert tensors["input_ids"].tolist() == [[1, 2, 7, 8, 9], [3, 10, 0, 0, 0], [4, 5, 6, 11, 12]]
    assert tensors["attention_mask"].sum(1).tolist() == [5, 2, 5]
    assert tensors["response_mask"].tolist() == [
        [False, False, True, True, True],
        [False, True, False, False, False],
        [False, False, False, True, True],
    ]
    np.testing.assert_allclose(tensors["behavior_logprobs"][2].numpy(), [0, 0, 0, -0.5, -0.6], rtol=1e-6)
    assert tensors["response_positions"].equal(tensors["response_mask"])  # no policy_mask: every token the policy's
    back = from_tensor(tensors["behavior_logprobs"], tensors["response_positions"])
    assert back.equals(table.column("behavior_logprobs").combine_chunks())


def test_teacher_topk_lies_on_the_response_grid_padded_with_minus_infinity():
    table = pa.table({"prompt_ids": [[1, 2], [3]], "response_ids": [[7, 8], [9, 10, 11]],
                      "teacher_topk": [[entries((7, -0.1), (5, -2.5)), entries((8, -0.01))],
                                       [entries((9, -0.3), (1, -1.5), (2, -3.0)), entries((10, -0.2)),
                                        entries((11, -0.7), (4, -0.9))]]})
    table = schema.validate(table, vocab_size=16)
    table = pa.concat_tables([table.slice(0, 1), table.slice(1, 1)])  # two chunks, as read in row groups
    tensors = to_tensors(table, pad_id=0, columns=(schema.TEACHER_TOPK,))
    ids, logprobs = tensors["teacher_topk_ids"], tensors["teacher_topk_logprobs"]
    assert ids.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert ids.shape == logprobs.shape == (2, 4, 3)  # [B, L, K], K the most entries of any token
    assert ids.tolist() == [[[0, 0, 0], [0, 0, 0], [7, 5, 0], [8, 0, 0]],
                            [[0, 0, 0], [9, 1, 2], [10, 0, 0], [11, 4, 0]]]
    inf = -math.inf
    expected = [[[inf, inf, inf], [inf, inf, inf], [-0.1, -2.5, inf], [-0.01, inf, inf]],
                [[inf, inf, inf], [-0.3, -1.5, -3.0], [-0.2, inf, inf], [-0.7, -0.9, inf]]]
    np.testing.assert_allclose(logprobs.numpy(), expected, rtol=1e-6)
    assert (torch.isfinite(logprobs).any(-1) == tensors["response_mask"]).all()


def test_environment_tokens_are_context_on_the_grid_but_not_in_the_response_mask():
    table = schema.validate(make_batch(policy_mask=POLICY_MASK))
    tensors = to_tensors(table, pad_id=0, columns=("behavior_logprobs",))
    assert tensors["input_ids"].tolist() == [[1, 2, 7, 8, 9], [3, 10, 0, 0, 0], [4, 5, 6, 11, 12]]
    assert tensors["attention_mask"].sum(1).tolist() == [5, 2, 5]
    assert tensors["response_positions"].tolist() == [
        [False, False, True, True, True],
        [False, True, False, False, False],
        [False, False, False, True, True],
    ]
    assert tensors["response_mask"].tolist() == [
        [False, False, True, False, True],
        [False, True, False, False, False],
        [False, False, False, False, True],
    ]
    # per-token values still at every response position, the environment's included
    np.testing.assert_allclose(tensors["behavior_logprobs"][0].numpy(), [0, 0, -0.1, -0.2, -0.3], rtol=1e-6)
    back = from_tensor(tensors["behavior_logprobs"], tensors["response_positions"])
    assert back.equals(table.column("behavior_logprobs").combine_chunks())
    zeroed = from_tensor(tensors["behavior_logprobs"], tensors["response_positions"], tensors["response_mask"])
    np.testing.assert_allclose(np.concatenate(zeroed.to_pylist()), [-0.1, 0.0, -0.3, -1.0, 0.0, -0.6], rtol=1e-6)


def test_from_tensor_keeps_rows_with_no_response_positions():
    mask = torch.tensor([[False, True], [False, False]])
    values = torch.tensor([[0.0, -1.0], [0.0, 0.0]])
    assert from_tensor(values, mask).to_pylist() == [[-1.0], []]


def test_jsonl_answers_mixing_numbers_and_text_read_as_text(tmp_path):
    path = tmp_path / "user.jsonl"
    path.write_text('{"id": 1, "prompt": "2+2?", "answer": 4}\n{"id": 2, "prompt": "Capital of France?", "answer": "Paris"}\n')
    table = read_table(path)
    assert table.column("answer").to_pylist() == ["4", "Paris"]
    assert table.column("id").to_pylist() == ["1", "2"]
