"""Kill points: named places in the code where a test can make the whole job crash on purpose, in windows too short
to hit from outside (a weight sync, a checkpoint write, an export). A testing hook in the manner of FoundationDB's
and fail-rs's fail points; unarmed, a point costs one environment lookup.

    PEAR_RAY_KILL_AT=<point>[:<n>]

The n-th time (default the first) a process passes `<point>`, it SIGKILLs the job's process group (the driver and
the Ray processes it started) and its own (Ray starts each worker in a group of its own): what a machine crash or
the OOM killer does to the job. The points (`kill_point` calls): `weight-sync` (a rollout actor has the new weights
and has not loaded them), `checkpoint-write/<checkpoint folder>` (every rank's files written, no manifest yet),
`export/<model folder>` (the Hugging Face folder complete under its `.partial` name, not yet renamed).

The driver hands the variable, and its process group as PEAR_RAY_JOB_GROUP, to every Ray worker (`job_env`, in
runtime.worker_env). tests/e2e/test_run_folder.py kills runs at these points and checks that a rerun resumes to the
results of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

KILL_AT_ENV = "PEAR_RAY_KILL_AT"
JOB_GROUP_ENV = "PEAR_RAY_JOB_GROUP"
_passes: Counter[str] = Counter()  # armed point -> times this process passed it


def kill_point(name: str) -> None:
    """Kill the job here when PEAR_RAY_KILL_AT arms this point and this is the pass it names."""
    armed = os.environ.get(KILL_AT_ENV)
    if armed is None:
        return
    point, _, nth = armed.partition(":")
    if point != name:
        return
    _passes[name] += 1
    if _passes[name] == int(nth or 1):
        _kill_job()


def _kill_job() -> None:
    job_group = os.environ.get(JOB_GROUP_ENV)
    if job_group:
        os.killpg(int(job_group), signal.SIGKILL)
    os.killpg(0, signal.SIGKILL)  # this process's own group, when it is not the job's


def job_env() -> dict[str, str]:
    """The variables a Ray worker needs to kill the whole job at an armed point (none when no point is armed)."""
    armed = os.environ.get(KILL_AT_ENV)
    if armed is None:
        return {}
    return {KILL_AT_ENV: armed, JOB_GROUP_ENV: os.environ.get(JOB_GROUP_ENV, str(os.getpgid(0)))}
