"""The `pear-ray` command: help for every subcommand, errors that name what is wrong and where, the console."""

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from pear_ray.cli import app, describe, user_facing

SUBCOMMANDS = ["run", "score", "sft", "rl", "eval", "inspect", "demo", "submit", "config", "validate", "tiny-model"]
SMOKE = str(Path(__file__).resolve().parents[2] / "jobs" / "smoke.yaml")
runner = CliRunner()


def test_console_script_is_installed_and_lists_every_subcommand():
    pear_ray = Path(sys.executable).parent / "pear-ray"
    result = subprocess.run([str(pear_ray), "--help"], capture_output=True, text=True, check=True)
    for name in [*SUBCOMMANDS, "jobs"]:
        assert name in result.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_explains_itself(name):
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    first_words = " ".join(_docstring(name).split()[:3])
    assert first_words in " ".join(result.output.split())


JOBS_SUBCOMMANDS = ["list", "status", "logs", "stop"]


def test_jobs_group_lists_and_explains_its_subcommands():
    result = runner.invoke(app, ["jobs", "--help"])
    assert result.exit_code == 0, result.output
    for name in JOBS_SUBCOMMANDS:
        assert name in result.output
        sub = runner.invoke(app, ["jobs", name, "--help"])
        assert sub.exit_code == 0, sub.output
        assert "--address" in sub.output


def test_submit_help_offers_address_and_wait():
    result = runner.invoke(app, ["submit", "--help"])
    assert result.exit_code == 0, result.output
    for option in ["--address", "--wait", "--no-wait", "--run-dir"]:
        assert option in result.output


def _docstring(name):
    for command in app.registered_commands:
        if (command.name or command.callback.__name__) == name:
            return command.callback.__doc__
    raise KeyError(name)


def test_config_prints_the_resolved_job_with_overrides():
    result = runner.invoke(app, ["config", SMOKE, "sft.pear.level=block", "rl.group_size=3"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    assert resolved["sft"]["pear"]["level"] == "block"
    assert resolved["rl"]["group_size"] == 3
    assert resolved["sft"]["pear"]["gamma"] == 0.999  # defaults filled in


def test_a_typo_exits_non_zero_naming_the_key():
    result = runner.invoke(app, ["config", SMOKE, "sft.pear.levle=block"])
    assert result.exit_code == 2
    assert "sft.pear.levle: unknown key" in result.output


@pytest.mark.parametrize("name", ["run", "score", "sft", "rl", "eval"])
def test_stage_commands_refuse_a_bad_job_before_starting_anything(name, tmp_path):
    result = runner.invoke(app, [name, SMOKE, "rl.group_size=1", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "rl.group_size: Input should be greater than or equal to 2" in result.output
    assert not (tmp_path / "run").exists()


BAD_INPUTS = {  # a console check of two; tests/test_preflight.py tries every class of bad input in process
    "malformed data.sft": (["data.sft={bad_jsonl}"], "bad.jsonl, line 2"),
    "bad YAML in an override": (["rl.group_size=[2,"], "rl.group_size"),
}


def _bad_input(tmp_path, args):
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"prompt": "1+1=", "response": "2"}\n{"prompt": "2+2=", "response": "4"\n')
    return [arg.format(bad_jsonl=bad_jsonl) for arg in args]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_message_naming_where_with_exit_status_2(case, tmp_path):
    args, where = BAD_INPUTS[case]
    run = subprocess.run([str(Path(sys.executable).parent / "pear-ray"), "run", SMOKE, "--run-dir",
                          str(tmp_path / "run"), *_bad_input(tmp_path, args)], capture_output=True, text=True)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and where in last, run.stderr
    assert not (tmp_path / "run").exists()


def test_an_unreachable_cluster_is_one_message_naming_the_address_with_exit_status_1(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}  # nothing listens on port 1
    run = subprocess.run([str(Path(sys.executable).parent / "pear-ray"), "run", SMOKE, "--run-dir", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: no Ray cluster answers at 127.0.0.1:1")


def test_errors_raised_in_ray_tasks_and_actors_are_unwrapped_to_their_cause():
    from ray.exceptions import ActorDiedError, RayTaskError

    cause = FileNotFoundError(2, "No such file or directory", "/data/sft.jsonl")
    in_task = RayTaskError("Actor.__init__", "Traceback (most recent call last): ...", cause)
    assert user_facing(in_task) is cause
    assert user_facing(in_task.as_instanceof_cause()) is cause
    assert user_facing(ActorDiedError(in_task)) is cause
    assert describe(user_facing(ActorDiedError(in_task))) == "No such file or directory: /data/sft.jsonl"
    runtime = RuntimeError("the learner ran out of memory")
    assert user_facing(runtime) is runtime


def test_debug_shows_the_traceback(tmp_path):
    args, where = BAD_INPUTS["bad YAML in an override"]
    run = subprocess.run([str(Path(sys.executable).parent / "pear-ray"), "--debug", "run", SMOKE, *args],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert "Traceback (most recent call last)" in run.stderr and where in run.stderr.strip().splitlines()[-1]


def test_version_prints_the_package_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"pear_ray {version('pear_ray')}"


def test_every_option_and_argument_is_explained_and_shows_its_default():
    group = typer.main.get_command(app)
    commands = [(name, command) for name, command in group.commands.items() if name != "jobs"]
    commands += [(f"jobs {name}", command) for name, command in group.commands["jobs"].commands.items()]
    for name, command in [("pear-ray", group), *commands]:
        for param in command.params:
            assert param.help, f"{name}: {param.name} has no help"
    submit = " ".join(runner.invoke(app, ["submit", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "[default: (RAY_API_SERVER_ADDRESS, RAY_ADDRESS if a URL, or http://127.0.0.1:8265)]" in submit
    assert "[default: (.)]" in submit
