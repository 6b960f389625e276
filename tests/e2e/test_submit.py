"""`pear-ray submit` against a real Ray head (token auth on, loopback only) run by Ray's own autoscaler
(tests/support/autoscaling.py: the node types of cluster/node_types.yaml, CPU only), and rollout nodes the autoscaler
launches and loses during an RL job. Everything is started and stopped by this module alone: never `ray stop`, which
would stop every Ray cluster of the user."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.autoscaling import AutoscalingCluster, base_env

REPO = Path(__file__).resolve().parents[2]
SMOKE = "jobs/smoke.yaml"
BIN = Path(sys.executable).parent
PEAR_RAY = str(BIN / "pear-ray")
SMALL = ["stages=[score]", "task.num_train=8", "score.teacher_sft_steps=5"]


@pytest.fixture(scope="module")
def ray_head():
    """A head with the autoscaler, its dashboard and a token of its own in a file (RAY_AUTH_TOKEN_PATH):
    ~/.ray/auth_token is neither read nor written. Up to two `rollout` nodes (one CPU each) when jobs ask."""
    with AutoscalingCluster(head_cpus=4, max_workers={"rollout": 2, "learner": 1}) as cluster:
        yield cluster


def _client_env(head, **extra) -> dict[str, str]:
    """What a user's shell has: the token where Ray looks for it (RAY_AUTH_TOKEN_PATH), nothing else."""
    return base_env(RAY_AUTH_TOKEN_PATH=str(head.token_file), **extra)


def _pear_ray(head, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([PEAR_RAY, *args], cwd=REPO, env=_client_env(head), capture_output=True, text=True,
                          timeout=timeout)


def _job_id(output: str) -> str:
    match = re.search(r"submitted job (\S+)", output)
    assert match, output
    return match.group(1)


@pytest.mark.slow  # about 50 s: a whole job on the cluster; the bad-config test submits in the default suite
def test_submit_wait_runs_the_job_on_the_cluster_and_writes_its_outputs(ray_head):
    out_dir = ray_head.temp / "out"
    result = _pear_ray(ray_head, "submit", SMOKE, *SMALL, f"output_dir={out_dir}",
                       "--address", ray_head.address, "--wait")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    job_id = _job_id(output)
    assert f"job {job_id}: SUCCEEDED" in output
    run_dir = out_dir / "smoke"
    assert (run_dir / "config.yaml").is_file(), output
    assert (run_dir / "data" / "sft.parquet").is_file(), output

    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(ray_head.address, headers=ray_head.headers)
    info = jobs.get_job_info(job_id)
    assert info.entrypoint.startswith("pear-ray run jobs/smoke.yaml 'stages=[score]' task.num_train=8")
    token = ray_head.token
    assert token not in output
    assert token not in jobs.get_job_logs(job_id)
    assert token not in repr(info.runtime_env) and token not in repr(info.metadata)

    status = _pear_ray(ray_head, "jobs", "status", job_id, "--address", ray_head.address, timeout=60)
    assert status.returncode == 0 and status.stdout.strip() == "SUCCEEDED", status.stdout + status.stderr
    listed = _pear_ray(ray_head, "jobs", "list", "--address", ray_head.address, timeout=60)
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout, listed.stdout + listed.stderr


def test_a_bad_config_is_refused_here_and_with_force_fails_on_the_cluster_with_the_error_in_its_logs(ray_head):
    refused = _pear_ray(ray_head, "submit", SMOKE, "sft.pear.levle=block", "--address", ray_head.address)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "sft.pear.levle: unknown key" in refused.stderr and "submitted job" not in refused.stdout

    result = _pear_ray(ray_head, "submit", SMOKE, "sft.pear.levle=block", "--address", ray_head.address,
                       "--wait", "--force")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "submitting it anyway (--force)" in output
    job_id = _job_id(output)
    assert f"job {job_id}: FAILED" in output

    from ray.job_submission import JobSubmissionClient

    logs = JobSubmissionClient(ray_head.address, headers=ray_head.headers).get_job_logs(job_id)
    assert "sft.pear.levle: unknown key" in logs
    assert ray_head.token not in output and ray_head.token not in logs


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
    env = base_env(HOME=str(tmp_path))
    args = [sys.executable, "-c", NO_TOKEN_CLIENT, ray_head.address, *([token] if token else [])]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert "REFUSED" in output
    expected = "Authentication required" if token is None else "Authentication failed"
    assert expected in output
    assert ray_head.token not in output


# RL straight from the (untrained) student, long enough for the autoscaler to launch rollout nodes and for one to be
# lost while it runs; the rollout actors ask for {rollout: 1}, which only a `rollout` node has, and the pool starts
# with one actor and may grow to two.
RL_STEPS = 240  # about 40 s of RL here; a rollout node takes ~4 s to launch, its vLLM actor ~10 s to start
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
    status = subprocess.run([str(BIN / "ray"), "status", "--address", head.gcs_address], env=env,
                            capture_output=True, text=True, timeout=60).stdout
    section = status.partition("From request_resources:")[2]
    match = re.search(r"'rollout': 1[^\n]*: (\d+) from request_resources|\(none\)", section)
    return (match.group(1) or "none") if match else None


@pytest.mark.slow  # about three minutes: the autoscaler launches two nodes, one is lost, both go (test_autoscaling
# has rollout nodes launched and removed in the default suite)
def test_the_autoscaler_launches_rollout_nodes_for_rl_and_the_pool_goes_on_when_one_is_lost(ray_head):
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(ray_head.address, headers=ray_head.headers)
    assert ray_head.alive("rollout") == []  # the rollout type scales from zero
    out_dir = ray_head.temp / "elastic"
    submitted = _pear_ray(ray_head, "submit", SMOKE, *ELASTIC, f"output_dir={out_dir}",
                          "--address", ray_head.address, "--no-wait")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = _job_id(submitted.stdout + submitted.stderr)
    run_dir = out_dir / "smoke"

    _wait_for(lambda: _rl_records(run_dir), jobs, job_id, "the first RL step")
    assert _rl_records(run_dir)[0]["rollout_actors"] == 1
    status_env = ray_head.client_env()
    _wait_for(lambda: _requested_rollout_bundles(ray_head, status_env) == "2", jobs, job_id,
              "the autoscaler was asked for max_actors rollout bundles")
    _wait_for(lambda: sum(r["rollout_actors"] == 2 for r in _rl_records(run_dir)) >= 3, jobs, job_id,
              "the pool grew onto a second rollout node and ran three steps there")  # each step uses every actor
    rollout_nodes = ray_head.alive("rollout")
    assert len(rollout_nodes) == 2 and all(node.resources["rollout"] == 1 for node in rollout_nodes)
    ray_head.kill_node(rollout_nodes[-1].node_id)  # lost without notice: its raylet and the actor on it die
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
    assert steps_before_leaving < RL_STEPS, "the run ended before the node was lost; give it more steps"
    # One actor after the loss; the autoscaler may replace the node (max_actors is still asked for) and the pool
    # grow onto it again before the end.
    assert set(actors[grew:]) <= {1, 2} and 1 in actors[steps_before_leaving:], actors
    assert records[-1]["rollout_actors_lost"] >= 1, actors
    assert all(r["rollout_requested"] == 2 for r in records)  # scale.by max: max_actors for the whole of RL
    assert "the pool has 2 actors" in logs and "going on with 1 actors" in logs
    assert (run_dir / "models" / "rl-token" / "config.json").is_file()
    deadline = time.monotonic() + 30  # the request is withdrawn at the end of RL...
    while _requested_rollout_bundles(ray_head, status_env) != "none" and time.monotonic() < deadline:
        time.sleep(1)
    assert _requested_rollout_bundles(ray_head, status_env) == "none"
    ray_head.wait_for_nodes("rollout", 0)  # ...so the autoscaler removes the rollout nodes, idle now
