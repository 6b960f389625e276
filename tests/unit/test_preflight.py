"""Preflight: every class of bad input a user can give is refused before anything starts, as one message on stderr
naming what is wrong and where, exit status 2, no traceback, and no run folder written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pear_ray.cli import app
from pear_ray.models import TinyModelSpec, build_tiny_model

SMOKE = str(Path(__file__).resolve().parents[2] / "jobs" / "smoke.yaml")
USER_TASK = ["task.kind=user", "task.args={{}}", "task.num_eval=1"]
ROWS = [{"prompt": f"{a}+{a}=", "response": str(2 * a)} for a in range(4)]
runner = CliRunner()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Bad inputs, one file or folder each, next to a few good ones."""
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "a-file").write_text("")
    (folder / "bad.jsonl").write_text('{"prompt": "1+1=", "response": "2"}\n{"prompt": "2+2=", "response": "4"\n')
    (folder / "numbers.jsonl").write_text('{"prompt": "1+1=", "response": "2"}\n{"prompt": 7, "response": "7"}\n')
    (folder / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9", "response": "x"}\n'.encode("latin-1"))
    (folder / "good.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    (folder / "long.jsonl").write_text(json.dumps({"prompt": "1+1=", "response": "2 " * 80}) + "\n")
    pq.write_table(pa.table({"prompt": [1, 2], "response": ["a", "b"]}), folder / "int-prompts.parquet")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "response": pa.array([], pa.string())}),
                   folder / "empty.parquet")
    (folder / "one-prompt.jsonl").write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    (folder / "string-ids.jsonl").write_text("".join(json.dumps(row) + "\n" for row in (
        {"prompt_ids": [3, 4], "response_ids": [5, 6]}, {"prompt_ids": "hello", "response_ids": [5, 6]},
        {"prompt_ids": [7], "response_ids": [8]})))
    model = build_tiny_model(TinyModelSpec(seed=1), folder / "model")
    for name, remove in {"no-weights": "*.safetensors", "no-tokenizer": "tokenizer*"}.items():
        shutil.copytree(model, folder / name)
        for path in (folder / name).glob(remove):
            path.unlink()
    shutil.copytree(model, folder / "cut-weights")
    weights = folder / "cut-weights" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    shutil.copytree(model, folder / "small-embedding")
    config = json.loads((folder / "small-embedding" / "config.json").read_text())
    (folder / "small-embedding" / "config.json").write_text(json.dumps(config | {"vocab_size": 300}))
    build_tiny_model(TinyModelSpec(seed=1, max_position_embeddings=64), folder / "short-model")
    return folder


def model(name: str) -> list[str]:
    return ["models.student.tiny=null", f"models.student.path={{inputs}}/{name}"]


BAD_INPUTS = {  # what is wrong -> (arguments after the job file, what the message must name)
    "unknown task name": (["task.name=no_such_task"], "task.name: reasoning-gym has no dataset 'no_such_task'"),
    "task args of another task": (["task.name=letter_counting"], "task.args"),
    "an environment nobody registered": (["task.environment={{kind: abacus}}"], "task.environment.kind"),
    "an environment's unknown args": (["task.environment={{kind: calculator, args: {{a: 1}}}}"],
                                      "task.environment.args"),
    "missing user-task file": ([*USER_TASK, "task.path={inputs}/missing.jsonl"], "missing.jsonl: no such file"),
    "too few user-task prompts": ([*USER_TASK, "task.path={inputs}/one-prompt.jsonl"], "one-prompt.jsonl: 1 distinct"),
    "custom reward that does not import": (["task.reward=no_such_module:reward"], "no_such_module"),
    "malformed data.sft": (["data.sft={inputs}/bad.jsonl"], "bad.jsonl, line 2: not valid JSON"),
    "non-text prompt in JSONL": (["data.sft={inputs}/numbers.jsonl"], "numbers.jsonl, line 2, column 'prompt': "
                                 "expected text, got int 7"),
    "non-UTF-8 JSONL": (["data.sft={inputs}/latin1.jsonl"], "latin1.jsonl, line 1: not UTF-8 text"),
    "non-text prompt in Parquet": (["data.sft={inputs}/int-prompts.parquet"], "column 'prompt': has type int64"),
    "empty Parquet": (["data.sft={inputs}/empty.parquet"], "empty.parquet: no rows"),
    "missing data file": (["data.sft={inputs}/missing.parquet"], "missing.parquet: no such file"),
    "no behaviour source": (["data.sft={inputs}/good.jsonl", "models.behavior=null"], "models.behavior"),
    "missing model folder": (model("no-model"), "models.student.path = '{inputs}/no-model': no such folder"),
    "model folder without weights": (model("no-weights"), "no-weights': no weights"),
    "cut-off weights": (model("cut-weights"), "model.safetensors is not a readable safetensors file"),
    "model folder without tokenizer": (model("no-tokenizer"), "no-tokenizer': no tokenizer files"),
    "embedding smaller than the tokenizer": (model("small-embedding"), "embedding only 300 rows"),
    "limits beyond the model's positions": (["data.max_prompt_tokens=500"],
                                            "models.student: the model has 512 positions"),
    "behaviour model with another tokenizer": (["models.behavior.tiny.vocab_size=300"],
                                               "models.behavior: its tokenizer differs from models.student's"),
    "LoRA target module the student lacks": (["models.student.lora={{target_modules: [q_proj, qkv_proj]}}"],
                                             "models.student.lora.target_modules: ['qkv_proj'] match no"),
    "LoRA of rank 0": (["models.student.lora={{r: 0}}"], "models.student.lora.r"),
    "LoRA of a rank vLLM cannot serve": (["models.student.lora={{r: 20}}", "resources.rollout.engine.max_lora_rank=16"],
                                         "resources.rollout.engine.max_lora_rank: vLLM serves LoRA adapters of rank up "
                                         "to 16"),
    "LoRA on the behaviour model": (["models.behavior.lora={{}}"], "models.behavior.lora: only models.student"),
    "logger not installed": (["loggers=[tensorboard,wandb]"], "logger 'wandb' was requested"),
    "run folder is a file": (["--run-dir", "{inputs}/a-file"], "a-file: a file is in the way"),
    "bad YAML in an override": (["rl.group_size=[2,"], "rl.group_size"),
    "unknown key": (["rl.group_sise=4"], "rl.group_sise: unknown key"),
}


def error_message(result) -> str:
    """What the CLI printed as its error: from the line that starts with "error: " to the end."""
    lines = result.stderr.splitlines()
    starts = [index for index, line in enumerate(lines) if line.startswith("error: ")]
    assert starts, result.stderr
    return "\n".join(lines[starts[0]:])


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_before_anything_starts(case, inputs, tmp_path):
    args, where = BAD_INPUTS[case]
    args = [arg.format(inputs=inputs) for arg in args]
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["run", SMOKE, *args, *([] if "--run-dir" in args else ["--run-dir", str(run_dir)])])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert where.format(inputs=inputs) in error_message(result), result.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("command", ["config", "rl", "eval", "inspect"])
def test_config_and_every_stage_command_run_the_same_checks(command, inputs, tmp_path):
    result = runner.invoke(app, [command, SMOKE, "task.name=no_such_task",
                                 *([] if command == "config" else ["--run-dir", str(tmp_path / "run")])])
    assert result.exit_code == 2 and "task.name" in error_message(result), result.output
    assert not (tmp_path / "run").exists()


def test_a_stage_whose_input_an_earlier_stage_writes_is_refused_until_that_stage_ran(tmp_path):
    result = runner.invoke(app, ["sft", SMOKE, "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and "run the score stage first" in error_message(result), result.output
    assert not (tmp_path / "run").exists()


def test_config_passes_a_good_job(inputs):
    result = runner.invoke(app, ["config", SMOKE, f"data.sft={inputs}/good.jsonl"])
    assert result.exit_code == 0, result.output
    assert "good.jsonl" in result.stdout


VALIDATE = {  # what is wrong -> (arguments of `validate`, what the message must name)
    "missing model folder": (["{inputs}/good.jsonl", "--model", "{inputs}/no-model"], "--model {inputs}/no-model"),
    "model without weights": (["{inputs}/good.jsonl", "--model", "{inputs}/no-weights"], "no weights"),
    "model without tokenizer": (["{inputs}/good.jsonl", "--model", "{inputs}/no-tokenizer"], "no tokenizer"),
    "rows beyond the positions": (["{inputs}/long.jsonl", "--model", "{inputs}/short-model",
                                   "--max-response-tokens", "100"],
                                  "long.jsonl, row 1: 112 prompt + response tokens, more than the 64"),
    "non-text prompt": (["{inputs}/numbers.jsonl", "--model", "{inputs}/model"], "line 2, column 'prompt'"),
    "a string among token-id lists": (["{inputs}/string-ids.jsonl", "--model", "{inputs}/model"],
                                      "{inputs}/string-ids.jsonl, line 2, column 'prompt_ids': expected "
                                      "list<item: int32>, got str 'hello'"),
    "empty Parquet": (["{inputs}/empty.parquet", "--model", "{inputs}/model"], "no rows"),
}


@pytest.mark.parametrize("case", VALIDATE)
def test_validate_refuses_what_run_would(case, inputs):
    args, where = VALIDATE[case]
    result = runner.invoke(app, ["validate", *(arg.format(inputs=inputs) for arg in args)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and where.format(inputs=inputs) in error_message(result)


def test_validate_refuses_a_limit_of_zero_tokens(inputs):
    result = runner.invoke(app, ["validate", f"{inputs}/good.jsonl", "--model", f"{inputs}/model",
                                 "--max-prompt-tokens", "0"])
    assert result.exit_code == 2 and "--max-prompt-tokens" in result.output


def test_validate_passes_good_data(inputs):
    result = runner.invoke(app, ["validate", f"{inputs}/good.jsonl", "--model", f"{inputs}/model"])
    assert result.exit_code == 0, result.output
    assert f"{len(ROWS)} rows OK" in result.stdout
