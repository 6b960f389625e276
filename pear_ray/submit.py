"""Submitting jobs to a Ray cluster through the Ray Jobs API (the dashboard's job server), and managing them.

The job runs `pear-ray run <job file> <overrides...>` on the cluster, with the working directory shipped in
its runtime environment; Ray sets RAY_ADDRESS for the entrypoint, so the driver joins that cluster.

Ray 2.60 turns token authentication on by default. The token is looked up the way Ray's own clients do
(ray._raylet.AuthenticationTokenLoader: the RAY_AUTH_TOKEN variable, else the file named by
RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, which `ray start --head` uses) and sent as the
`authorization: Bearer ...` HTTP header. It is never printed and never put in the job's runtime environment.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TextIO

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Gitignore-style patterns left out of the shipped working directory.
EXCLUDES = [".venv", "runs", ".git", "__pycache__"]
POLL_SECONDS = 1.0
AGENT_WAIT_SECONDS = 60.0


class SubmitError(ValueError):  # bad input: the CLI exits 2
    """The job cannot be submitted as asked (e.g. the job file is outside the shipped working directory)."""


def default_address() -> str:
    """The Jobs API address: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS when it is an http(s) URL (a bare
    host:port there is a GCS address, not the dashboard's), else the local dashboard."""
    api = os.environ.get("RAY_API_SERVER_ADDRESS")
    if api:
        return api
    ray_address = os.environ.get("RAY_ADDRESS", "")
    if ray_address.startswith(("http://", "https://")):
        return ray_address
    return DEFAULT_ADDRESS


def _normalise(address: str | None) -> str:
    address = address or default_address()
    if "://" not in address:
        address = f"http://{address}"
    return address


def auth_headers() -> dict[str, str]:
    """`{"authorization": "Bearer <token>"}` from wherever Ray keeps the token, or {} when there is none.

    `ignore_auth_mode=True` loads the token even when this process has no RAY_AUTH_MODE=token (a client
    usually does not; the cluster decides whether it checks). The cache is reset so a token file or variable
    changed since the last call is read again.
    """
    try:
        from ray._raylet import AuthenticationTokenLoader
    except ImportError:  # minimal Ray without the compiled core: no token support either
        return {}
    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()
    return dict(loader.get_token_for_http_header(ignore_auth_mode=True))


def client(address: str | None = None):
    """A JobSubmissionClient for `address` carrying the auth token (if any)."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(_normalise(address), headers=auth_headers())


def entrypoint(job_file: str, overrides: list[str], run_dir: str | Path | None = None) -> str:
    """The shell command the cluster runs: `pear-ray run <job file> <overrides...> [--run-dir DIR]`."""
    argv = ["pear-ray", "run", job_file, *overrides]
    if run_dir is not None:
        argv += ["--run-dir", str(run_dir)]
    return shlex.join(argv)


def _job_file_in(working_dir: Path, job_file: Path) -> str:
    job_file = job_file.resolve()
    try:
        return job_file.relative_to(working_dir).as_posix()
    except ValueError:
        raise SubmitError(
            f"job file {job_file} is outside the working directory {working_dir} that is shipped to the "
            "cluster: move it there or pass --working-dir"
        ) from None


def check_locally(job_file: Path, overrides: list[str], working_dir: Path, *, force: bool, out: TextIO) -> None:
    """The job's preflight, here, as the cluster will see it (paths relative to the shipped working directory). A
    failure refuses the job, unless `force` (data only the cluster can see): then it is a warning."""
    from pear_ray.config import load_job
    from pear_ray.driver.preflight import preflight

    try:
        job = load_job(job_file, overrides)
        with contextlib.chdir(working_dir):
            preflight(job, None)
    except ValueError as error:
        if not force:
            raise
        out.write(f"warning: the job fails the local checks; submitting it anyway (--force): {error}\n")


def submit_job(
    job_file: str | Path,
    overrides: list[str] | None,
    address: str | None,
    *,
    wait: bool,
    working_dir: str | Path | None = None,
    run_dir: str | Path | None = None,
    force: bool = False,
    out: TextIO | None = None,
) -> tuple[str, str]:
    """Submit `pear-ray run job_file overrides` to the cluster at `address` and return (job id, status).

    The working directory (default: the current one) is shipped with the job, less EXCLUDES; the job file
    must lie inside it. The job passes preflight here first (see `check_locally`). With `wait`, follow the job's logs to `out` until it ends, and return its final
    status (SUCCEEDED, FAILED or STOPPED); without, return the status right after submission.
    """
    out = out or sys.stdout
    overrides = list(overrides or [])
    working_dir = Path(working_dir or Path.cwd()).resolve()
    relative_job_file = _job_file_in(working_dir, Path(job_file))
    check_locally(Path(job_file), overrides, working_dir, force=force, out=sys.stderr)

    jobs = client(address)
    job_id = _submit_when_agent_ready(
        jobs,
        entrypoint=entrypoint(relative_job_file, overrides, run_dir),
        runtime_env={"working_dir": str(working_dir), "excludes": list(EXCLUDES)},
    )
    out.write(f"submitted job {job_id}\n")
    out.flush()
    if not wait:
        return job_id, str(jobs.get_job_status(job_id).value)
    return job_id, str(follow_logs(jobs, job_id, out).value)


def _submit_when_agent_ready(jobs, *, agent_wait_seconds: float = AGENT_WAIT_SECONDS, **job) -> str:
    """`jobs.submit_job(**job)`, retried while the head answers "No available agent to submit job, please
    try again later" (its job agent is still starting, e.g. just after `ray start` on a busy machine)."""
    deadline = time.monotonic() + agent_wait_seconds
    while True:
        try:
            return jobs.submit_job(**job)
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(POLL_SECONDS)


def follow_logs(jobs, job_id: str, out: TextIO, poll_seconds: float = POLL_SECONDS):
    """Write the job's logs to `out` as they grow until the job ends; return its final JobStatus.

    Polls get_job_status / get_job_logs (plain HTTP with the client's headers) rather than the websocket
    tail: simple, and it cannot hang on a dropped stream. The status is read before the logs so that the
    last read after a terminal status holds the complete log.
    """
    shown = 0
    while True:
        status = jobs.get_job_status(job_id)
        logs = jobs.get_job_logs(job_id)
        if len(logs) > shown:
            out.write(logs[shown:])
            out.flush()
            shown = len(logs)
        if status.is_terminal():
            return status
        time.sleep(poll_seconds)


def list_jobs(address: str | None = None) -> list:
    """Every job the cluster knows (JobDetails), oldest first."""
    return sorted(client(address).list_jobs(), key=lambda job: job.start_time or 0)


def job_status(job_id: str, address: str | None = None) -> str:
    return str(client(address).get_job_status(job_id).value)


def job_logs(job_id: str, address: str | None = None, *, follow: bool = False, out: TextIO | None = None) -> str:
    """The job's logs so far; with `follow`, stream them to `out` until the job ends and return its status."""
    jobs = client(address)
    if follow:
        return str(follow_logs(jobs, job_id, out or sys.stdout).value)
    return jobs.get_job_logs(job_id)


def stop_job(job_id: str, address: str | None = None) -> bool:
    """Ask the cluster to stop the job; False if it had already ended."""
    return bool(client(address).stop_job(job_id))
