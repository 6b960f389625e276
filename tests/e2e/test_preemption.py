"""Preemption drills on a cluster of several nodes on this machine: a node that holds learner ranks or rollout actors
is drained (Ray's preemption notice, with a deadline, after which the node is killed as a cloud would) or killed
without notice in the middle of a job, and the job finishes with the uninterrupted run's results: every step logged
once, the same losses, samples and final weights.

The drills see the cluster only through `LocalCluster.start_node`, `drain` and `kill`, so another way of making
nodes (an autoscaler's) can stand in for it. Everything is started and stopped by this module alone: never
`ray stop`, which would stop every Ray cluster of the user.
"""

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
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file
from support.cli import ROOT, finish, pear_ray, steps, stop_group
from support.learner import write_scored_sft_rows

BIN = Path(sys.executable).parent
NODE_SCRIPT = str(ROOT / "tests" / "support" / "ray_worker_node.py")
SMOKE = str(ROOT / "jobs" / "smoke.yaml")
DEADLINE_S = 30  # notice given before a drained node is killed (Ray's own on SIGTERM: 30 s)
# What `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds N` does, kept running so
# a drill's notice is not late by the seconds that command takes to start.
DRAINER = """
import sys, time
import ray
from ray.core.generated import autoscaler_pb2

gcs = ray._raylet.GcsClient(address=sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    node, seconds = line.split()
    accepted, why = gcs.drain_node(node, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                   "preemption drill", int((time.time() + int(seconds)) * 1000))
    print("accepted" if accepted else f"refused: {why}", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Node:
    id: str
    process: subprocess.Popen  # tests/support/ray_worker_node.py: the raylet and the node's workers are below it

    def processes(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def runs(self, actor_class: str) -> bool:
        """An actor of that class lives on this node."""
        return any(_cmdline(proc).startswith(f"ray::{actor_class}") for proc in self.processes())

    def alive(self) -> bool:
        return self.process.poll() is None


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


class LocalCluster:
    """A Ray head and worker nodes on 127.0.0.1, token auth on, in a temp dir of their own."""

    def __init__(self, head_cpus: float = 2, head_resources: dict[str, float] | None = None):
        self.temp = Path(tempfile.mkdtemp(prefix="prp", dir="/tmp"))  # short: unix socket paths
        token_file = self.temp / "auth_token"
        token_file.write_text(secrets.token_hex(32))
        token_file.chmod(0o600)
        self.gcs_address = f"127.0.0.1:{_free_port()}"
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
        self.env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
                        RAY_AUTH_TOKEN_PATH=str(token_file), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
        self.nodes: list[Node] = []
        self.timers: list[threading.Timer] = []
        self.head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={self.gcs_address.rpartition(':')[2]}",
             "--node-ip-address=127.0.0.1", f"--num-cpus={head_cpus}", "--include-dashboard=false",
             f"--resources={json.dumps(head_resources or {})}",
             f"--temp-dir={self.temp / 'r'}", "--disable-usage-stats"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while not (self.temp / "r" / "session_latest" / "sockets" / "raylet").exists():
            assert self.head.poll() is None and time.monotonic() < deadline, "the head did not start"
            time.sleep(0.5)
        self.drainer = subprocess.Popen([sys.executable, "-c", DRAINER, self.gcs_address], env=self.env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        assert self.drainer.stdout.readline() == "ready\n"

    def start_node(self, resources: dict[str, float], num_cpus: float = 1) -> Node:
        """A worker node with these custom resources (they pin roles to it), joined to the head."""
        process = subprocess.Popen([sys.executable, NODE_SCRIPT, self.gcs_address, str(self.temp / "r"),
                                    str(num_cpus), json.dumps(resources)],
                                   env=self.env, stdout=subprocess.PIPE, text=True, start_new_session=True)
        line = process.stdout.readline()
        assert line.startswith("NODE_ID"), f"a node did not join: {line!r}"
        self.nodes.append(Node(line.split()[1], process))
        return self.nodes[-1]

    def drain(self, node: Node, deadline_s: int = DEADLINE_S) -> None:
        """Ray's preemption notice (as `ray drain-node`: reason PREEMPTION, the deadline); the node is killed at the
        deadline, as a cloud reclaims a spot VM (Ray itself never kills a node for its deadline)."""
        self.drainer.stdin.write(f"{node.id} {deadline_s}\n")
        self.drainer.stdin.flush()
        assert self.drainer.stdout.readline() == "accepted\n"
        self.timers.append(threading.Timer(deadline_s, self.kill, [node]))
        self.timers[-1].start()

    def kill(self, node: Node) -> None:
        """The node gone at once, without notice: SIGKILL to its raylet and every process on it."""
        for proc in node.processes():
            try:
                proc.kill()
            except psutil.Error:
                pass
        node.process.wait(timeout=30)

    def job_env(self) -> dict[str, str]:
        """A driver's environment: the cluster's address and token."""
        return {**self.env, "RAY_ADDRESS": self.gcs_address}

    def shutdown(self) -> None:
        for timer in self.timers:
            timer.cancel()
        for node in self.nodes:
            self.kill(node)
        self.drainer.kill()
        self.head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            self.head.wait(timeout=60)
        finally:
            for group in [self.head.pid, self.drainer.pid, *(node.process.pid for node in self.nodes)]:
                try:
                    os.killpg(group, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            shutil.rmtree(self.temp, ignore_errors=True)


def run_job(cluster: LocalCluster, *args: str) -> subprocess.Popen:
    return pear_ray("run", SMOKE, *args, env=cluster.job_env())


def watch(process: subprocess.Popen, until, what: str, timeout: float = 300):
    """Poll `until()` while the job runs; its first true value."""
    deadline = time.monotonic() + timeout
    while not (found := until()):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_group(process)
            raise AssertionError(f"the job ended or ran out of time before {what}:\n{process.stdout.read()[-4000:]}")
        time.sleep(0.1)
    return found


def node_running(nodes: list[Node], actor_class: str):
    return lambda: next((node for node in nodes if node.runs(actor_class)), None)


def wait_until_gone(nodes: list[Node], actor_class: str, timeout: float = 60) -> None:
    """No actor of that class is left on the nodes (an earlier job's is on its way out)."""
    deadline = time.monotonic() + timeout
    while node_running(nodes, actor_class)():
        assert time.monotonic() < deadline, f"a {actor_class} of an earlier job is still there"
        time.sleep(0.2)


def weights(run_dir: Path, model: str) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "models" / model / "model.safetensors"))


def assert_same_weights(run_dir: Path, reference: Path, model: str) -> None:
    ours, theirs = weights(run_dir, model), weights(reference, model)
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-7, err_msg=name)


def assert_same_steps(run_dir: Path, reference: Path, stage: str, *, besides: tuple[str, ...] = ()) -> list[dict]:
    """Every step of `stage` logged once, as in the reference run, with its figures (but for durations and
    `besides`: how the run got there)."""
    ours, theirs = steps(run_dir, stage), steps(reference, stage)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(1, len(theirs) + 1))
    for got, record in zip(ours, theirs, strict=True):
        for name in record.keys() - {"time", "stage", "variant", *besides}:
            if not name.endswith(("_seconds", "_busy")):
                assert got[name] == pytest.approx(record[name], rel=1e-5, abs=1e-6), (stage, record["step"], name)
    return ours


def drill_row(**figures) -> None:
    """One row of the drills' table, on the test's output (pytest -s shows it)."""
    print("DRILL", json.dumps(figures))


# ------------------------------------------------------------------ a rollout node drained mid-map

# A driver on the cluster: a pool of three actors (one on the head, one on each worker node) maps items that take half
# a second each; it asks the test to drain the first worker node (a 30 s deadline: its calls in flight may finish
# there) after 3 results, the second (a 2 s deadline: too near to finish anything) after 8, and reports where each
# item ran.
POOL_DRILL = """
import json, sys, time
from dataclasses import asdict

import ray

from pear_ray.actors.pool import ActorPool, batch_stats
from pear_ray.runtime import init_ray


@ray.remote(num_cpus=0.1, resources={"rollout": 1})
class Worker:
    @ray.method(num_returns=2)
    def work(self, item, seconds):
        started = time.perf_counter()
        time.sleep(seconds)
        return item * 10, batch_stats(1, 1, started, node=ray.get_runtime_context().get_node_id())


def drain(node, deadline_s):
    print("drain", node, deadline_s, flush=True)
    assert sys.stdin.readline() == "drained\\n"


init_ray()
pool = ActorPool.start(lambda slot: Worker.remote(), 3, min_size=1)
nodes = {slot: ray.get(member.ready) for slot, member in pool.slots.items()}
head = ray.get_runtime_context().get_node_id()
first, second = [node for node in nodes.values() if node != head]
results = []
for index, ref, stats in pool.map("work", range(20), seconds=0.5):
    results.append([index, ray.get(ref), stats["node"]])
    if len(results) == 3:
        drain(first, 30)
    elif len(results) == 8:
        drain(second, 2)
print(json.dumps({"results": results, "stats": asdict(pool.stats), "nodes": [head, first, second],
                  "slots": {slot: member.node for slot, member in pool.slots.items()},
                  "leaving": len(pool.members.leaving)}))
"""


def test_a_rollout_node_drained_mid_map_gets_no_new_work_and_its_calls_finish_or_run_elsewhere():
    cluster = LocalCluster(head_resources={"rollout": 1})
    try:
        nodes = {node.id: node for node in (cluster.start_node({"rollout": 1}), cluster.start_node({"rollout": 1}))}
        started = time.monotonic()
        driver = subprocess.Popen([sys.executable, "-c", POOL_DRILL], env=cluster.job_env(), text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output = []
        for line in driver.stdout:
            output.append(line)
            if line.startswith("drain "):
                _, node, deadline_s = line.split()
                cluster.drain(nodes[node], int(deadline_s))
                driver.stdin.write("drained\n")
                driver.stdin.flush()
        assert driver.wait(timeout=60) == 0, "".join(output)
        seconds = time.monotonic() - started
    finally:
        cluster.shutdown()
    report = json.loads(output[-1])
    results, stats = report["results"], report["stats"]
    head, first, second = report["nodes"]
    assert sorted(index for index, _, _ in results) == list(range(20))  # every item once
    assert all(value == index * 10 for index, value, _ in results)
    assert [node for _, _, node in results[3:8]].count(first) >= 1  # its calls in flight finished there
    assert {node for _, _, node in results[-8:]} == {head}  # after both notices, new work went to the head only
    assert stats["resubmitted"] >= 1  # the second node's calls in flight, given up at once, ran on the head
    assert stats["actors_drained"] == stats["actors_dropped"] == 2 and stats["actors_replaced"] == 0
    assert list(report["slots"].values()) == [head] and report["leaving"] == 0  # both left and went
    drill_row(node="rollout", phase="pool map", notice=True, steps_lost=0, batches_rerun=stats["resubmitted"],
              identical=True, seconds=round(seconds, 1))


# ------------------------------------------------------------------ a learner node drained mid-SFT

ROWS, BATCH, EPOCHS, CHECKPOINT_EVERY = 32, 4, 12, 50  # 96 SFT steps (~12 s here), one checkpoint at step 50


@pytest.fixture(scope="module")
def scored_data(tmp_path_factory) -> Path:
    """SFT rows that already carry behaviour log-probs, so the score stage only copies them (no vLLM)."""
    return write_scored_sft_rows(tmp_path_factory.mktemp("data") / "sft.jsonl", ROWS)


@pytest.fixture(scope="module")
def learner_cluster():
    """A head without learner resources and two nodes that each hold one learner rank."""
    cluster = LocalCluster()
    try:
        cluster.start_node({"learner": 1})
        cluster.start_node({"learner": 1})
        yield cluster
    finally:
        cluster.shutdown()


def sft_job(data: Path, run_dir: Path) -> list[str]:
    return ["stages=[score,sft]", f"data.sft={data}", "models.behavior=null", "score.teacher_sft_steps=0",
            f"sft.batch_size={BATCH}", f"sft.epochs={EPOCHS}", f"sft.checkpoint_every={CHECKPOINT_EVERY}",
            "resources.learner.resources={learner: 1}", "--run-dir", str(run_dir)]


@pytest.mark.slow  # about 90 s: two SFT runs on a cluster of three nodes
def test_a_learner_node_drained_mid_sft_costs_no_step(learner_cluster, scored_data, tmp_path):
    reference, run_dir = tmp_path / "reference", tmp_path / "drill"
    started = time.monotonic()
    finish(run_job(learner_cluster, *sft_job(scored_data, reference)))
    reference_seconds = time.monotonic() - started
    wait_until_gone(learner_cluster.nodes, "LearnerWorker")

    started = time.monotonic()
    process = run_job(learner_cluster, *sft_job(scored_data, run_dir))
    drained = watch(process, node_running(learner_cluster.nodes, "LearnerWorker"), "the learner rank started")
    watch(process, lambda: (run_dir / "metrics.jsonl").is_file() and len(steps(run_dir, "sft")) >= 10, "SFT step 10")
    learner_cluster.drain(drained)  # the learner sees it within a second
    output = finish(process)
    seconds = time.monotonic() - started

    moved = re.search(r"is draining .*; stopped after step (\d+), checkpointed there; starting the stage again on "
                      r"other nodes", output)
    assert moved, output[-5000:]
    stopped, resumed = int(moved.group(1)), int(re.search(r"sft-token: resuming at step (\d+)", output).group(1))
    first, second = re.findall(r"learner group up: .*, on node\(s\) (\w+)", output)
    assert first == drained.id and second != drained.id  # the new group is on the other node
    assert resumed == stopped < ROWS // BATCH * EPOCHS  # no step trained twice: nothing lost
    assert_same_steps(run_dir, reference, "sft")
    assert_same_weights(run_dir, reference, "sft-token")
    drill_row(node="learner", phase="sft", notice=True, notice_at_step=stopped, steps_lost=stopped - resumed,
              lost_without_notice=stopped % CHECKPOINT_EVERY, identical=True, seconds=round(seconds, 1),
              uninterrupted_seconds=round(reference_seconds, 1))


# ------------------------------------------------------------------ a rollout node drained or killed mid-RL

RL_STEPS = 12
# What differs between a run whose rollout actor moved and one whose did not, but not its results: the pool's counts,
# samples regenerated because a new actor started on the start weights, the two engines' log-prob agreement.
POOL_FIGURES = ("rollout_actors_lost", "rollout_batches_rerun", "stale_regenerated", "mismatch_max", "mismatch_mean")


@pytest.fixture(scope="module")
def rollout_cluster():
    """A head that holds the learner, and nodes that each hold one rollout actor (two live ones at each drill's
    start)."""
    cluster = LocalCluster()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def rollout_nodes(cluster: LocalCluster) -> list[Node]:
    """The cluster's two live rollout nodes, one started in place of each that an earlier drill took away."""
    live = [node for node in cluster.nodes if node.alive()]
    return live + [cluster.start_node({"rollout": 1}) for _ in range(2 - len(live))]


def rl_job(run_dir: Path) -> list[str]:
    """RL straight from the tiny student, every step trained (its rewards may all be equal), one rollout actor."""
    return ["stages=[rl]", f"rl.steps={RL_STEPS}", "rl.prompts_per_step=4", "rl.group_size=4", "rl.checkpoint_every=4",
            "rl.drop_constant_groups=false", "rl.save_rollouts=true", "sampling.max_tokens=16",
            "resources.rollout={num_actors: 1, num_cpus: 0.5, resources: {rollout: 1}}", "--run-dir", str(run_dir)]


@pytest.fixture(scope="module")
def rl_reference(rollout_cluster, tmp_path_factory) -> tuple[Path, float]:
    """The uninterrupted run's folder, and the seconds it took."""
    run_dir = tmp_path_factory.mktemp("rl") / "reference"
    nodes = rollout_nodes(rollout_cluster)
    started = time.monotonic()
    finish(run_job(rollout_cluster, *rl_job(run_dir)))
    seconds = time.monotonic() - started
    wait_until_gone(nodes, "RolloutWorker")
    return run_dir, seconds


def samples(run_dir: Path, step: int) -> list[list[int]]:
    return pq.read_table(run_dir / "rollouts" / "rl-token" / f"step-{step:06d}.parquet").column("response_ids").to_pylist()


def rollout_drill(cluster: LocalCluster, reference: Path, run_dir: Path, take_away) -> tuple[str, list[dict], float]:
    """Run RL, take the rollout actor's node away with `take_away(node)` after step 3, then check the run ends with
    the reference's results, the rollouts on the other node; returns the output, the RL rows and the seconds the run
    took."""
    nodes = rollout_nodes(cluster)
    started = time.monotonic()
    process = run_job(cluster, *rl_job(run_dir))
    watch(process, lambda: (run_dir / "metrics.jsonl").is_file() and len(steps(run_dir, "rl")) >= 3, "RL step 3")
    gone = watch(process, node_running(nodes, "RolloutWorker"), "the rollout actor started")
    take_away(gone)
    [spare] = [node for node in nodes if node is not gone]
    watch(process, lambda: spare.runs("RolloutWorker"), "a rollout actor on the other node")
    output = finish(process)
    seconds = time.monotonic() - started
    print("\n".join(line for line in output.splitlines() if "WARNING" in line))
    rows = assert_same_steps(run_dir, reference, "rl", besides=POOL_FIGURES)
    for step in range(1, RL_STEPS + 1):
        assert samples(run_dir, step) == samples(reference, step), step
    assert_same_weights(run_dir, reference, "rl-token")
    assert "rl-token: resuming" not in output  # the learner never restarted
    return output, rows, seconds


@pytest.mark.slow  # about two minutes: two RL runs
def test_a_rollout_node_drained_mid_rl_hands_its_work_to_another(rollout_cluster, rl_reference, tmp_path):
    reference, reference_seconds = rl_reference
    output, rows, seconds = rollout_drill(rollout_cluster, reference, tmp_path / "drill", rollout_cluster.drain)
    assert re.search(r"rollout actor 0 is on a draining node \(\d+ calls to finish there\); replacing it", output)
    assert "lost (" not in output  # it left; it was not lost
    drill_row(node="rollout", phase="rl", notice=True, steps_lost=0, batches_rerun=rows[-1]["rollout_batches_rerun"],
              identical=True, seconds=round(seconds, 1), uninterrupted_seconds=round(reference_seconds, 1))


@pytest.mark.slow  # about two minutes: two RL runs
def test_a_rollout_node_killed_mid_rl_costs_no_step(rollout_cluster, rl_reference, tmp_path):
    reference, reference_seconds = rl_reference
    output, rows, seconds = rollout_drill(rollout_cluster, reference, tmp_path / "drill", rollout_cluster.kill)
    assert re.search(r"rollout actor 0 lost \(Actor(Unavailable|Died)Error\); replacing it", output)
    drill_row(node="rollout", phase="rl", notice=False, steps_lost=0, batches_rerun=rows[-1]["rollout_batches_rerun"],
              identical=True, seconds=round(seconds, 1), uninterrupted_seconds=round(reference_seconds, 1))
