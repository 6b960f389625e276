"""`pear-ray submit` against a real `ray start --head` (token auth on, loopback only), and a second node joining
and leaving it during an RL job. Everything is started and stopped by this module alone: never `ray stop`, which
would stop every Ray cluster of the user."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
SMOKE = "jobs/smoke.yaml"
BIN = Path(sys.executable).parent
PEAR_RAY = str(BIN / "pear-ray")
SMALL = ["stages=[score]", "task.num_train=8", "score.teacher_sft_steps=5"]
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _base_env(**extra: str) -> dict[str, str]:
    """This process's environment without any RAY_* setting (addresses, auth, and what an embedded ray.init()
    in this pytest process may have exported, which breaks the head's job agent), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONBREAKPOINT"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `pear-ray` for the job entrypoint
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every socket on 127.0.0.1
    env.update(extra)
    return env


def _head_processes(session_id: int, marker: str) -> list[psutil.Process]:
    """Every process of our head: those in the session `ray start` ran in (its daemons inherit it), those whose
    command line names our temp dir, and all their descendants (workers, the job supervisor's driver and
    watcher, which start sessions of their own)."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            ours = os.getsid(proc.pid) == session_id or marker in " ".join(proc.info["cmdline"] or [])
            if ours and proc.pid != os.getpid():
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _kill_head(session_id: int, marker: str) -> list[psutil.Process]:
    """SIGTERM then SIGKILL everything of our head; rescan until nothing is left. Returns what survived."""
    for _ in range(5):
        procs = _head_processes(session_id, marker)
        if not procs:
            return []
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=3)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
    return _head_processes(session_id, marker)


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head with token auth and a dashboard, in a short temp dir of its own (unix socket path limit),
    with a token of its own in a file (RAY_AUTH_TOKEN_PATH): ~/.ray/auth_token is neither read nor written."""
    from ray.job_submission import JobSubmissionClient

    temp = Path(tempfile.mkdtemp(prefix="prs", dir="/tmp"))
    token = secrets.token_hex(32)
    token_file = temp / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    ray_temp = temp / "r"
    gcs_port, dash_port = _free_port(), _free_port()
    env = _base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    # Ports of its own for the dashboard agent and metrics: Ray's defaults (e.g. agent 52365) are already taken
    # when the test session's embedded Ray instance runs, and the job server then finds no agent.
    start = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--num-cpus=4",
         f"--resources={json.dumps({'rollout': 1})}",  # room for one rollout actor; a joining node brings more
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
         f"--temp-dir={ray_temp}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    session_id = start.pid  # start_new_session: the session id is the leader's pid, inherited by the daemons
    marker = str(temp)
    try:
        output, _ = start.communicate(timeout=120)
        assert start.returncode == 0, output
        address = f"http://127.0.0.1:{dash_port}"
        headers = {"authorization": f"Bearer {token}"}
        deadline = time.monotonic() + 60
        while True:  # the job server answers a moment after `ray start` returns
            try:
                JobSubmissionClient(address, headers=headers).list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield {"address": address, "token": token, "token_file": token_file, "temp": temp,
               "headers": headers, "gcs_address": f"127.0.0.1:{gcs_port}"}
    finally:
        left = _kill_head(session_id, marker)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"processes of the test head survived: {[p.pid for p in left]}"


def _client_env(head, **extra) -> dict[str, str]:
    """What a user's shell has: the token where Ray looks for it (RAY_AUTH_TOKEN_PATH), nothing else."""
    return _base_env(RAY_AUTH_TOKEN_PATH=str(head["token_file"]), **extra)


def _pear_ray(head, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([PEAR_RAY, *args], cwd=REPO, env=_client_env(head), capture_output=True, text=True,
                          timeout=timeout)


def _job_id(output: str) -> str:
    match = re.search(r"submitted job (\S+)", output)
    assert match, output
    return match.group(1)


def test_submit_wait_runs_the_job_on_the_cluster_and_writes_its_outputs(ray_head):
    out_dir = ray_head["temp"] / "out"
    result = _pear_ray(ray_head, "submit", SMOKE, *SMALL, f"output_dir={out_dir}",
                       "--address", ray_head["address"], "--wait")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    job_id = _job_id(output)
    assert f"job {job_id}: SUCCEEDED" in output
    run_dir = out_dir / "smoke"
    assert (run_dir / "config.yaml").is_file(), output
    assert (run_dir / "data" / "sft.parquet").is_file(), output

    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(ray_head["address"], headers=ray_head["headers"])
    info = jobs.get_job_info(job_id)
    assert info.entrypoint.startswith("pear-ray run jobs/smoke.yaml 'stages=[score]' task.num_train=8")
    token = ray_head["token"]
    assert token not in output
    assert token not in jobs.get_job_logs(job_id)
    assert token not in repr(info.runtime_env) and token not in repr(info.metadata)

    status = _pear_ray(ray_head, "jobs", "status", job_id, "--address", ray_head["address"], timeout=60)
    assert status.returncode == 0 and status.stdout.strip() == "SUCCEEDED", status.stdout + status.stderr
    listed = _pear_ray(ray_head, "jobs", "list", "--address", ray_head["address"], timeout=60)
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout, listed.stdout + listed.stderr


def test_a_bad_config_is_refused_here_and_with_force_fails_on_the_cluster_with_the_error_in_its_logs(ray_head):
    refused = _pear_ray(ray_head, "submit", SMOKE, "sft.pear.levle=block", "--address", ray_head["address"])
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "sft.pear.levle: unknown key" in refused.stderr and "submitted job" not in refused.stdout

    result = _pear_ray(ray_head, "submit", SMOKE, "sft.pear.levle=block", "--address", ray_head["address"],
                       "--wait", "--force")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "submitting it anyway (--force)" in output
    job_id = _job_id(output)
    assert f"job {job_id}: FAILED" in output

    from ray.job_submission import JobSubmissionClient

    logs = JobSubmissionClient(ray_head["address"], headers=ray_head["headers"]).get_job_logs(job_id)
    assert "sft.pear.levle: unknown key" in logs
    assert ray_head["token"] not in output and ray_head["token"] not in logs


NO_TOKEN_CLIENT = """
import sys
from ray.job_submission import JobSubmissionClient
headers = {"authorization": "Bearer " + sys.argv[2]} if len(sys.argv) > 2 else None
try:
    JobSubmissionClient(sys.argv[1], headers=headers).list_jobs()
except Exception as error:
    print("REFUSED", type(error).__name__, error)
    sys.exit(3)
print("ACCEPTED")
"""


@pytest.mark.parametrize("token", [None, "wrong"], ids=["no-token", "wrong-token"])
def test_a_client_without_the_token_is_refused(ray_head, tmp_path, token):
    # No token anywhere Ray looks: no variables, and a HOME without ~/.ray/auth_token.
    env = _base_env(HOME=str(tmp_path))
    args = [sys.executable, "-c", NO_TOKEN_CLIENT, ray_head["address"], *([token] if token else [])]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert "REFUSED" in output
    expected = "Authentication required" if token is None else "Authentication failed"
    assert expected in output
    assert ray_head["token"] not in output


NODE_SCRIPT = str(Path(__file__).parents[1] / "support" / "ray_worker_node.py")
# RL straight from the (untrained) student, long enough for a node to join and leave while it runs; the rollout
# pool starts with the head's one `rollout` slot and may grow to two.
RL_STEPS = 240  # about 40 s here: a node joining takes ~10 s (raylet, then a vLLM actor), leaving ~2 s
ELASTIC = ["stages=[rl]", f"rl.steps={RL_STEPS}", "rl.prompts_per_step=8", "rl.group_size=4", "sampling.max_tokens=32",
           "resources.rollout={num_actors: 1, max_actors: 2, num_cpus: 0.5, resources: {rollout: 1}}"]
FINISHED = {"SUCCEEDED", "FAILED", "STOPPED"}


def _rl_records(run_dir: Path) -> list[dict]:
    from pear_ray.tracking import read_metrics

    return [record for record in read_metrics(run_dir) if record["stage"] == "rl"]


def _wait_for(condition, jobs, job_id: str, what: str, timeout: float = 240):
    """Poll `condition` until it holds; fail at once, with the job's logs, if the job ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        status = str(jobs.get_job_status(job_id).value)
        assert status not in FINISHED and time.monotonic() < deadline, (
            f"job {status} before {what}:\n{jobs.get_job_logs(job_id)[-4000:]}")
        time.sleep(0.5)


def _requested_rollout_bundles(head, env) -> str | None:
    """How many rollout bundles the autoscaler was asked for, per `ray status` ("none" when nothing is asked)."""
    status = subprocess.run([str(BIN / "ray"), "status", "--address", head["gcs_address"]], env=env,
                            capture_output=True, text=True, timeout=60).stdout
    section = status.partition("From request_resources:")[2]
    match = re.search(r"'rollout': 1[^\n]*: (\d+) from request_resources|\(none\)", section)
    return (match.group(1) or "none") if match else None


@pytest.mark.slow  # about two minutes: a second node joins and leaves a real cluster (test_elastic grows a pool in
# process in the default suite)
def test_the_rollout_pool_grows_when_a_node_joins_mid_rl_and_goes_on_when_it_leaves(ray_head):
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(ray_head["address"], headers=ray_head["headers"])
    out_dir = ray_head["temp"] / "elastic"
    submitted = _pear_ray(ray_head, "submit", SMOKE, *ELASTIC, f"output_dir={out_dir}",
                          "--address", ray_head["address"], "--no-wait")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = _job_id(submitted.stdout + submitted.stderr)
    run_dir = out_dir / "smoke"

    _wait_for(lambda: _rl_records(run_dir), jobs, job_id, "the first RL step")
    assert _rl_records(run_dir)[0]["rollout_actors"] == 1  # the head has room for one rollout actor only
    node_env = _base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(ray_head["token_file"]))
    _wait_for(lambda: _requested_rollout_bundles(ray_head, node_env) == "2", jobs, job_id,
              "the autoscaler was asked for max_actors rollout bundles")
    node = subprocess.Popen([sys.executable, NODE_SCRIPT, ray_head["gcs_address"], str(ray_head["temp"] / "r"),
                             "1", json.dumps({"rollout": 1})], env=node_env, stdout=subprocess.PIPE, text=True)
    try:
        assert node.stdout.readline().startswith("NODE_ID"), "the second node did not join"
        _wait_for(lambda: sum(r["rollout_actors"] == 2 for r in _rl_records(run_dir)) >= 3, jobs, job_id,
                  "the pool grew onto the new node and ran three steps there")  # each step uses every actor
    finally:
        node.terminate()  # the node leaves: its raylet and the rollout actor on it die
        node.wait(timeout=60)
    steps_before_leaving = len(_rl_records(run_dir))

    deadline = time.monotonic() + 300
    while (status := str(jobs.get_job_status(job_id).value)) not in FINISHED and time.monotonic() < deadline:
        time.sleep(1)
    logs = jobs.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    records = _rl_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, RL_STEPS + 1))
    assert all(r["samples"] == 8 * 4 for r in records)  # every prompt's group came back, once, every step
    actors = [r["rollout_actors"] for r in records]
    grew = actors.index(2)
    assert set(actors[grew:]) <= {1, 2} and actors[-1] == 1, actors
    assert steps_before_leaving < RL_STEPS, "the run ended before the node left; give it more steps"
    assert records[-1]["rollout_actors_lost"] >= 1, actors
    assert "the pool has 2 actors" in logs and "going on with 1 actors" in logs
    assert (run_dir / "models" / "rl-token" / "config.json").is_file()
    deadline = time.monotonic() + 30  # the request is withdrawn, so an autoscaler may scale the group down
    while _requested_rollout_bundles(ray_head, node_env) != "none" and time.monotonic() < deadline:
        time.sleep(1)
    assert _requested_rollout_bundles(ray_head, node_env) == "none"
