"""The `pear-ray` command: help for every subcommand, config errors that name the key."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pear_ray.cli import app

SUBCOMMANDS = ["run", "score", "sft", "rl", "eval", "inspect", "demo", "submit", "config", "validate", "tiny-model"]
SMOKE = str(Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml")
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
