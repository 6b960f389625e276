"""The Arrow data plane: bad batches are refused naming file, row and column; padding round-trips."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from pear_ray.data import schema
from pear_ray.data.io import DataError, read_table, write_table
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
    ],
)
def test_bad_batches_name_row_and_column(overrides, column, row, message):
    with pytest.raises(schema.SchemaError) as caught:
        schema.validate(make_batch(**overrides), vocab_size=16, source="data.parquet", row_offset=100)
    error = caught.value
    assert (error.column, error.row) == (column, 100 + row)
    assert str(error).startswith(f"data.parquet, column '{column}', row {100 + row}: ")
    assert message in str(error)


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
    with pytest.raises(DataError, match="rows disagree on a column's type"):
        read_table(path)


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
    back = from_tensor(tensors["behavior_logprobs"], tensors["response_mask"])
    assert back.equals(table.column("behavior_logprobs").combine_chunks())


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
