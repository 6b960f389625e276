"""Kill points (pear_ray/faults.py): armed, the n-th pass SIGKILLs the job's process group and the process's own;
unarmed or at another pass, nothing happens."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pear_ray import faults

PASS_TWICE = "import faults; faults.kill_point('p'); faults.kill_point('p'); print('passed twice')"


def run(code: str, **env: str) -> subprocess.CompletedProcess:
    """`code` in a Python process in a session (and process group) of its own. faults.py imports nothing of the
    package, so it is loaded on its own, in milliseconds rather than the package's seconds."""
    path = {"PYTHONPATH": str(Path(faults.__file__).parent)}
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **path, **env}, capture_output=True,
                          text=True, timeout=60, start_new_session=True)


@pytest.mark.parametrize(("armed", "survives"), [("q", True), ("p:3", True), ("p:2", False)])
def test_a_point_kills_on_the_pass_it_names(armed, survives):
    done = run(PASS_TWICE, **{faults.KILL_AT_ENV: armed})
    assert (done.returncode, done.stdout.strip()) == ((0, "passed twice") if survives else (-signal.SIGKILL, ""))


def test_a_process_in_a_group_of_its_own_kills_the_job_group_too():
    """As a Ray worker does (Ray starts each in a process group of its own): the job's group, which job_env names,
    dies with it."""
    worker = ("import os, subprocess, sys; import faults;"
              "subprocess.run([sys.executable, '-c', 'import faults; faults.kill_point(\"p\")'],"
              " env={**os.environ, **faults.job_env()}, start_new_session=True); print('the job lived on')")
    done = run(worker, **{faults.KILL_AT_ENV: "p"})
    assert (done.returncode, done.stdout) == (-signal.SIGKILL, "")
