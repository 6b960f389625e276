"""A run folder is bound to the config its results came from, can be started anew with --fresh, can move, and
resumes a run killed at any point to the results of an uninterrupted one, every step logged once."""

import json
import os
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from support.cli import ROOT, SMALL, finish, pear_ray, steps, stop_group

from pear_ray import faults
from pear_ray.atomic import partial_name
from pear_ray.config import ConfigError, load_job
from pear_ray.driver import experiment
from pear_ray.driver.run import RunState
from pear_ray.engines.checkpoints import MANIFEST
from pear_ray.tracking import read_metrics

JOB = [str(ROOT / "jobs" / "smoke.yaml"), *SMALL, "stages=[score,sft]"]
FILES = ("config.yaml", "report.md", "state.json", "metrics.jsonl")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One finished run of score and SFT; tests that change it work on a copy."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    finish(pear_ray("run", *JOB, "--run-dir", str(run_dir)))
    return run_dir


@pytest.fixture
def run_dir(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def snapshot(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    return {name: ((run_dir / name).read_bytes(), (run_dir / name).stat().st_mtime_ns) for name in FILES}


def every_file(run_dir: Path) -> dict[Path, tuple[bytes, int]]:
    return {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in run_dir.rglob("*") if path.is_file()}


def test_a_rerun_with_other_settings_is_refused_and_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    RunState(run_dir, load_job(JOB[0], JOB[1:]))  # the folder as a run of JOB leaves it from its start: bound
    (run_dir / "data").mkdir()
    (run_dir / "data" / "sft.parquet").write_bytes(b"scored data")
    before = every_file(run_dir)
    process = pear_ray("run", *JOB, "sft.optimizer.lr=0.5", "task.name=letter_counting", "--run-dir", str(run_dir))
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 2, output
    assert "sft.optimizer.lr: 0.0001 -> 0.5" in output
    assert 'task.name: "basic_arithmetic" -> "letter_counting"' in output
    assert "--fresh" in output and "Traceback" not in output
    assert "Ray" not in output  # refused before Ray started
    assert every_file(run_dir) == before


@pytest.mark.slow  # about 40 s: a stage runs again
def test_settings_that_do_not_change_results_may_differ_and_a_stage_added_resumes(run_dir):
    sft_steps = steps(run_dir, "sft")
    output = finish(pear_ray("run", *JOB, "loggers=[]", "resources.learner.num_cpus=0.25", "stages=[score,sft,eval]",
                             "--run-dir", str(run_dir)))
    assert "score: done in an earlier run, skipping" in output and "sft/token: done in an earlier run" in output
    assert "eval_sft/token" in json.loads((run_dir / "state.json").read_text())["done"]
    assert steps(run_dir, "sft") == sft_steps


@pytest.mark.slow  # about 40 s: a stage runs again
def test_fresh_moves_the_old_folder_aside_and_starts_anew(run_dir):
    before = snapshot(run_dir)
    output = finish(pear_ray("run", *JOB, "sft.optimizer.lr=0.5", "stages=[score]", "--fresh", "--run-dir", str(run_dir)))
    [aside] = [path for path in run_dir.parent.iterdir() if path.name.startswith("run-")]
    assert str(aside) in output
    assert snapshot(aside) == before  # the old run, whole
    state = json.loads((run_dir / "state.json").read_text())
    assert set(state["done"]) == {"score"} and state["config"]["sft"]["optimizer"]["lr"] == 0.5
    assert not (run_dir / "models" / "sft-token").exists()


@pytest.mark.slow  # about 30 s: a stage runs again
def test_a_moved_folder_resumes_from_another_directory(run_dir, tmp_path):
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    run_dir.rename(moved)
    done = json.loads((moved / "state.json").read_text())["done"]
    for key in ("score", "sft/token"):
        assert not Path(done[key]).is_absolute() and (moved / done[key]).exists()
    output = finish(pear_ray("run", *JOB, "stages=[score,sft,eval]", "--run-dir", "moved", cwd=moved.parent))
    assert "score: done in an earlier run, skipping" in output and "sft/token: done in an earlier run" in output
    assert [r["step"] for r in steps(moved, "sft")] == [1, 2, 3, 4]  # not trained again
    assert "eval_sft/token" in json.loads((moved / "state.json").read_text())["done"]


def test_a_state_file_without_a_config_is_refused_naming_the_folder(tmp_path):
    """A folder from before runs were bound to their config: nothing to check the job against, so it is refused
    (one message, what to do) rather than resumed with results that may come from other settings."""
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    (run_dir / "state.json").write_text(json.dumps({"done": {"score": "data/sft.parquet"}}))
    with pytest.raises(ConfigError, match=rf"run folder {run_dir} was written by an older pear_ray.*--fresh"):
        RunState(run_dir, load_job(ROOT / "jobs" / "smoke.yaml"))


def test_every_cell_of_an_experiment_is_checked_before_any_runs(tmp_path, monkeypatch):
    job = load_job(ROOT / "jobs" / "smoke.yaml", ["seeds=[0,1]"])
    [(_, first, _), (_, second, cell)] = experiment.cells(job)
    RunState(tmp_path / second, cell.model_copy(update={"task": cell.task.model_copy(update={"num_eval": 3})}))
    monkeypatch.setattr(experiment, "init_ray", lambda: pytest.fail("Ray started before every cell was checked"))
    with pytest.raises(ConfigError, match=r"(?s)seed1 holds the results of another config.*task.num_eval: 3 -> 8"):
        experiment.run_experiment(job, tmp_path)
    assert not (tmp_path / first).exists()


def stop_session(process) -> None:
    """SIGKILL the job's process group, then whatever else is left of its session: Ray starts its workers in
    process groups of their own, and they die only seconds after their raylet, maybe while a rerun has started."""
    stop_group(process)
    deadline = time.monotonic() + 60
    while left := [other for other in psutil.process_iter() if alive_in_session(other, process.pid)]:
        assert time.monotonic() < deadline, f"still running after SIGKILL: {left}"
        for other in left:
            with suppress(psutil.Error):
                other.kill()
        time.sleep(0.1)


def alive_in_session(process: psutil.Process, session: int) -> bool:
    try:
        return os.getsid(process.pid) == session and process.status() != psutil.STATUS_ZOMBIE
    except (OSError, psutil.Error):
        return False


@dataclass(frozen=True)
class At:
    """A kill point inside the job: `point` arms a fail point (pear_ray/faults.py, `<name>[:<n>]`) on the killed
    run only, the rerun is the same command without it; `left(run_dir)` checks the crash's traces."""
    point: str
    left: Callable[[Path], bool]


def kill(run_dir: Path, kill_point: At | Callable[[Path], bool], *args: str) -> None:
    """Run the job into `run_dir` and kill all of it at `kill_point`: an armed fail point (At), or as soon as a
    condition on the run folder holds."""
    if isinstance(kill_point, At):
        kill_at(run_dir, kill_point, *args)
    else:
        kill_when(run_dir, kill_point, *args)


def kill_at(run_dir: Path, kill_point: At, *args: str) -> None:
    """Run the job into `run_dir` with `kill_point.point` armed: the job SIGKILLs itself there."""
    armed = {**os.environ, faults.KILL_AT_ENV: kill_point.point}
    process = pear_ray("run", *args, "--run-dir", str(run_dir), env=armed)
    try:
        output, _ = process.communicate(timeout=600)
    finally:
        stop_session(process)
    assert process.returncode == -signal.SIGKILL, f"the run did not die at {kill_point.point}:\n{output[-3000:]}"
    assert kill_point.left(run_dir), f"the run died at {kill_point.point} but left no trace of it there"


def kill_when(run_dir: Path, condition: Callable[[Path], bool], *args: str) -> None:
    """Run the job into `run_dir` and SIGKILL all of it (the CLI and the Ray processes it started) as soon as
    `condition(run_dir)` holds."""
    process = pear_ray("run", *args, "--run-dir", str(run_dir))
    deadline = time.monotonic() + 600
    try:
        while not condition(run_dir):
            assert process.poll() is None, "the run ended before the kill point:\n" + process.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the kill point never came"
            time.sleep(0.05)
    finally:
        stop_session(process)
        process.communicate(timeout=60)


def logged_steps(run_dir: Path) -> Counter:
    return Counter((r["stage"], r["variant"], r["step"]) for r in read_metrics(run_dir))


def assert_same_results(run_dir: Path, reference: Path, stages: set[str]) -> None:
    """Every (stage, variant, step) of `stages` logged once, as in the reference run, with the same values (but
    for durations); the same SFT data."""
    logged = logged_steps(run_dir)
    assert [key for key, count in logged.items() if count > 1] == []
    expected = [r for r in read_metrics(reference) if r["stage"] in stages]
    assert set(logged) == {(r["stage"], r["variant"], r["step"]) for r in expected}
    ours = {(r["stage"], r["variant"], r["step"]): r for r in read_metrics(run_dir)}
    for record in expected:
        got = ours[record["stage"], record["variant"], record["step"]]
        assert got.keys() == record.keys()
        for name in record.keys() - {"time", "stage", "variant", "step"}:
            if name.endswith(("_seconds", "_busy")):  # wall-clock figures: how long, not what
                continue
            assert got[name] == pytest.approx(record[name], rel=1e-4, abs=1e-5), (record["stage"], record["step"], name)
    data, full = pq.read_table(run_dir / "data" / "sft.parquet"), pq.read_table(reference / "data" / "sft.parquet")
    assert data.column("response_ids").equals(full.column("response_ids"))
    np.testing.assert_allclose(np.concatenate(data.column("behavior_logprobs").to_pylist()),
                               np.concatenate(full.column("behavior_logprobs").to_pylist()), atol=1e-5)


def trained_past_a_checkpoint(name: str, stage: str):
    """Kill point: training `name` has a checkpoint and has logged `stage` steps after it (rows a resume must drop)."""
    def condition(run_dir: Path) -> bool:
        latest = run_dir / "checkpoints" / name / "latest"
        if not latest.is_file():
            return False
        checkpointed = int(latest.read_text().removeprefix("step"))
        return any(r["stage"] == stage and r["step"] > checkpointed for r in read_metrics(run_dir))
    return condition


def checkpoint_cut(name: str):
    """Kill point's trace: a checkpoint folder of training `name` without its manifest (its write was cut)."""
    return lambda run_dir: any(not (folder / MANIFEST).exists()
                               for folder in (run_dir / "checkpoints" / name).glob("step*"))


def export_cut(name: str):
    """Kill point's trace: the export of models/`name` complete under its partial name, never renamed."""
    return lambda run_dir: (partial_name(run_dir / "models" / name).is_dir()
                            and not (run_dir / "models" / name).exists())


def rl_checkpointed_its_first_step_only(run_dir: Path) -> bool:
    """Kill point's trace: RL logged and checkpointed step 1 and died before logging step 2."""
    return ([r["step"] for r in steps(run_dir, "rl")] == [1]
            and (run_dir / "checkpoints" / "rl-token" / "latest").exists())


def leftovers(run_dir: Path) -> list[Path]:
    """What a crash can leave: partial files and folders, checkpoint folders without their manifest."""
    return [*run_dir.rglob("*.partial"), *(folder for folder in (run_dir / "checkpoints").glob("*/step*")
                                           if not (folder / MANIFEST).exists())]


TEACHER_KILL_POINTS = {  # 20 teacher steps, a checkpoint every 5
    "after a checkpoint": trained_past_a_checkpoint("teacher_sft", "teacher_sft"),
    "writing its second checkpoint": At("checkpoint-write/teacher_sft:2", checkpoint_cut("teacher_sft")),
}


@pytest.mark.parametrize("kill_point", [  # about 45 s each; the object-storage test kills a run in the default suite
    pytest.param("after a checkpoint", marks=pytest.mark.slow),
    pytest.param("writing its second checkpoint", marks=pytest.mark.slow)])
def test_a_run_killed_during_teacher_training_resumes_with_each_step_logged_once(finished, tmp_path, kill_point):
    """SIGKILL of the whole job while the score stage trains its teacher, after a checkpoint or while writing the
    next: the rerun continues from the last whole checkpoint, the rows logged after it go, the cut checkpoint is
    written again, and the results are the uninterrupted run's."""
    run_dir = tmp_path / "run"
    job = [*JOB, "stages=[score]", "sft.checkpoint_every=5"]  # 20 teacher steps: checkpoints at 5, 10, 15
    kill(run_dir, TEACHER_KILL_POINTS[kill_point], *job)
    assert "score" not in json.loads((run_dir / "state.json").read_text())["done"]
    output = finish(pear_ray("run", *job, "--run-dir", str(run_dir)))
    assert "teacher_sft: resuming at step" in output
    assert [r["step"] for r in steps(run_dir, "teacher_sft")] == list(range(1, 21))
    assert_same_results(run_dir, finished, {"teacher_sft", "score"})
    assert leftovers(run_dir) == []


FULL = [str(ROOT / "jobs" / "smoke.yaml"), *SMALL, "sft.batch_size=4", "sft.checkpoint_every=3",
        "rl.checkpoint_every=1", "rl.drop_constant_groups=false"]  # the tiny student earns no reward: RL steps anyway
KILL_POINTS = {  # every stage; training before, after and while writing a checkpoint; the weight sync; exports
    "teacher before its first checkpoint": lambda run_dir: (
        any(r["stage"] == "teacher_sft" for r in read_metrics(run_dir))
        and not (run_dir / "checkpoints" / "teacher_sft" / "latest").exists()),
    "teacher after a checkpoint": trained_past_a_checkpoint("teacher_sft", "teacher_sft"),
    "teacher writing its second checkpoint": At("checkpoint-write/teacher_sft:2", checkpoint_cut("teacher_sft")),
    "the trained teacher writing the data": lambda run_dir: (run_dir / "models" / "behavior-trained").is_dir(),
    "sft after a checkpoint": trained_past_a_checkpoint("sft-token", "sft"),
    "sft writing its second checkpoint": At("checkpoint-write/sft-token:2", checkpoint_cut("sft-token")),
    "sft exporting": At("export/sft-token", export_cut("sft-token")),
    "eval after sft": lambda run_dir: (run_dir / "eval" / "sft-token.parquet").exists(),
    "rl writing its checkpoint": At("checkpoint-write/rl-token", checkpoint_cut("rl-token")),
    "rl after a checkpoint": trained_past_a_checkpoint("rl-token", "rl"),
    "rl syncing the weights after a checkpoint": At("weight-sync:2", rl_checkpointed_its_first_step_only),
    "rl exporting": At("export/rl-token", export_cut("rl-token")),
}


def report_lines(run_dir: Path) -> list[str]:
    """report.md less when and where it was written."""
    return [line for line in (run_dir / "report.md").read_text().splitlines()
            if not line.startswith(("- date:", "- run folder:"))]


@pytest.fixture(scope="module")
def finished_full(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished_full") / "run"
    finish(pear_ray("run", *FULL, "--run-dir", str(run_dir)))
    return run_dir


@pytest.mark.slow  # about 2 minutes a kill point
@pytest.mark.parametrize("kill_point", KILL_POINTS)
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_results(finished_full, tmp_path, kill_point):
    run_dir = tmp_path / "run"
    kill(run_dir, KILL_POINTS[kill_point], *FULL)
    finish(pear_ray("run", *FULL, "--run-dir", str(run_dir)))
    assert_same_results(run_dir, finished_full, {r["stage"] for r in read_metrics(finished_full)})
    assert report_lines(run_dir) == report_lines(finished_full)
    assert leftovers(run_dir) == []


def test_a_folder_from_before_a_key_existed_resumes_while_the_key_keeps_its_default(tmp_path):
    """A newer pear_ray adds keys whose defaults keep the old behaviour (task.environment, task.reward_models, ...):
    a folder written before them is still this config's, and a non-default value of a new key is a change."""
    job = load_job(ROOT / "jobs" / "smoke.yaml")
    RunState(tmp_path, job)
    state = json.loads((tmp_path / "state.json").read_text())
    del state["config"]["task"]["environment"], state["config"]["task"]["reward_models"]
    (tmp_path / "state.json").write_text(json.dumps(state))
    RunState(tmp_path, job)  # the old folder resumes
    calculator = load_job(ROOT / "jobs" / "smoke.yaml", ["task.kind=addition", "task.args={}",
                                                         "task.environment={kind: calculator}"])
    with pytest.raises(ConfigError, match=r'(?s)another config.*task\.environment\.kind: "\(unset\)" -> "calculator"'):
        RunState(tmp_path, calculator)
