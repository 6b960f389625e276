"""A local autoscaling Ray cluster for the tests: Ray's own autoscaler with its fake multi-node provider, each node a
set of Ray processes on this machine, all on 127.0.0.1, token auth on. Its node types are cluster/node_types.yaml's
(the shipped configs' own), CPU only, with the same custom resources: a job whose rollout actors ask for
{rollout: 1} makes the autoscaler launch `rollout` nodes here as it would GPU nodes on a cloud.

    with AutoscalingCluster(max_workers={"rollout": 2}) as cluster:
        subprocess.run([PEAR_RAY, "submit", JOB, "--address", cluster.address], env=cluster.client_env())
        cluster.wait_for_nodes("rollout", 2)   # the autoscaler launched two
        cluster.nodes()                        # [Node(node_id, type, state, resources), ...]
    # stopped: every process of this head and of the nodes it launched, and nothing else

It is started the way that works from the wheel: `ray start --head --block --autoscaling-config=CFG` with
RAY_FAKE_CLUSTER=1 (the fake provider refuses to run without it), AUTOSCALER_UPDATE_INTERVAL_S=1 (an autoscaler
round a second, not every five) and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (loopback only) in its environment; the
provider is that one, but a node killed by a drill stops being listed, as on a cloud
(provider/reclaimable_provider.py). It is stopped by SIGTERM to that `ray start` process, which ends every node the autoscaler launched, then anything of its
own left over. ray.cluster_utils.AutoscalingCluster is not used: it reads a config file the wheel does not ship, and
its start and shutdown run `ray stop --force`, which stops every Ray instance of the user on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

NODE_TYPES_FILE = Path(__file__).resolve().parents[2] / "cluster" / "node_types.yaml"
BIN = Path(sys.executable).parent
HEAD = "head"
FAKE_HEAD_TYPE = "ray.head.default"  # what the fake provider calls its head, whatever the config says
# What `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds N` does, kept running so a
# drill's notice is not late by the seconds that command takes to start: one "NODE_ID SECONDS" line per notice.
DRAINER = """
import sys, time
import ray
from ray.core.generated import autoscaler_pb2

gcs = ray._raylet.GcsClient(address=sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    node, seconds = line.split()
    accepted, why = gcs.drain_node(node, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                   "preemption drill", int((time.time() + float(seconds)) * 1000))
    print("accepted" if accepted else f"refused: {why}", flush=True)
"""


def node_types() -> dict[str, dict[str, Any]]:
    """The node types every cluster config declares (cluster/node_types.yaml)."""
    return yaml.safe_load(NODE_TYPES_FILE.read_text())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    """This process's environment without any RAY_* setting (addresses, auth, and what an embedded ray.init() in the
    test process may have exported, which breaks a head's job agent), with this venv's executables first on PATH,
    every socket on 127.0.0.1, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONBREAKPOINT"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `pear-ray` for a job's entrypoint
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env.update(extra)
    return env


def fake_provider_config(gcs_port: int, *, worker_cpus: dict[str, int], max_workers: dict[str, int],
                         idle_timeout_s: float) -> dict[str, Any]:
    """The autoscaling config of a local cluster with cluster/node_types.yaml's node types: each worker type's custom
    resources and min_workers as defined, `worker_cpus` CPUs and no GPU a node, at most `max_workers` nodes of it
    (default: as defined)."""
    types = node_types()
    workers = {name: spec for name, spec in types.items() if name != HEAD}
    available = {FAKE_HEAD_TYPE: {"resources": dict(types[HEAD]["resources"]), "node_config": {}, "max_workers": 0}}
    for name, spec in workers.items():
        maximum = max_workers.get(name, spec["max_workers"])
        available[name] = {"resources": {"CPU": worker_cpus.get(name, 1), **spec["resources"]}, "node_config": {},
                           "min_workers": min(spec["min_workers"], maximum), "max_workers": maximum}
    commands = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")
    return {
        "cluster_name": "pear-ray-test",
        "max_workers": sum(spec["max_workers"] for spec in available.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60,
        "provider": {"type": "external", "module": "reclaimable_provider.ReclaimableFakeProvider",
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{gcs_port}"},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": available,
        "head_node_type": FAKE_HEAD_TYPE,
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
        **{command: [] for command in commands},
    }


@dataclass(frozen=True)
class Node:
    """A node as the cluster sees it: its type (`head`, or a type of cluster/node_types.yaml; None for a node the
    autoscaler has not reported yet), its state (ALIVE or DEAD) and the resources it declares."""

    node_id: str
    type: str | None
    state: str
    resources: dict[str, float]


class AutoscalingCluster:
    """A head with the autoscaler, started by `start()` (or `with`), stopped by `stop()`.

    `head_cpus`: the head's CPUs (the driver, the learner and tasks that ask for no custom resource run there);
    `worker_cpus` and `max_workers`: per worker type, the CPUs of one node (default 1; a whole number, as Ray's
    cluster config schema wants) and the most nodes (default
    cluster/node_types.yaml's); `idle_timeout_s`: how long a node sits idle before the autoscaler removes it;
    `node_env`: what every node's environment has besides (as a cloud image or instance role gives it: a store's
    endpoint and credentials).
    Submit jobs to `address` (the Jobs API) with `client_env()`; `gcs_address` is for `ray status` and ray.init.
    """

    def __init__(self, *, head_cpus: float = 2, worker_cpus: dict[str, int] | None = None,
                 max_workers: dict[str, int] | None = None, idle_timeout_s: float = 6.0,
                 node_env: dict[str, str] | None = None):
        self.head_cpus = head_cpus
        self.worker_cpus = worker_cpus or {}
        self.max_workers = max_workers or {}
        self.idle_timeout_s = idle_timeout_s
        self.node_env = node_env or {}
        self.temp: Path | None = None
        self.process: subprocess.Popen | None = None
        self.types: dict[str, str] = {}  # node id -> type, as the autoscaler reported it while the node was up
        self.drainer: subprocess.Popen | None = None  # DRAINER, once a node was drained
        self.deadlines: list[threading.Timer] = []  # a drained node killed at its deadline

    # ------------------------------------------------------------------ start and stop

    def start(self, timeout_s: float = 120) -> AutoscalingCluster:
        # A short folder of its own: Ray's unix sockets live under it and their paths have a length limit.
        self.temp = Path(tempfile.mkdtemp(prefix="pras", dir="/tmp"))
        self.token = secrets.token_hex(32)
        self.token_file = self.temp / "auth_token"
        self.token_file.write_text(self.token)
        self.token_file.chmod(0o600)
        gcs_port, dashboard_port = free_port(), free_port()
        self.gcs_address = f"127.0.0.1:{gcs_port}"
        self.address = f"http://127.0.0.1:{dashboard_port}"
        config = self.temp / "autoscaling.json"
        config.write_text(json.dumps(fake_provider_config(
            gcs_port, worker_cpus=self.worker_cpus, max_workers=self.max_workers, idle_timeout_s=self.idle_timeout_s)))
        # A raylet on a busy 2-core box may take longer than Ray's 30 s to register with the GCS (seen once in CI).
        env = base_env(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="token",
                       RAY_raylet_start_wait_time_s="120",
                       RAY_AUTH_TOKEN_PATH=str(self.token_file), PYTHONPATH=str(Path(__file__).parent / "provider"),
                       **self.node_env)
        self.log = self.temp / "head.log"
        # Ports of its own for the dashboard agent and metrics: Ray's defaults are taken while the test session's
        # embedded Ray instance runs, and the job server then finds no agent.
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
                 f"--num-cpus={self.head_cpus}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                 f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                 f"--autoscaling-config={config}", f"--temp-dir={self.temp / 'r'}", "--disable-usage-stats"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_until_up(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_up(self, timeout_s: float) -> None:
        """Until the Jobs API answers and the head is listed with its type."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"`ray start --head` exited with {self.process.returncode}:\n"
                                   f"{self.log.read_text()[-3000:]}")
            try:
                self._get("/api/jobs/", attempts=1)
                if any(node.type == HEAD for node in self.nodes()):
                    return
            except (OSError, ValueError):  # not listening yet, or answering before it is ready
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the head did not come up in {timeout_s:.0f} s:\n{self.log.read_text()[-3000:]}")
            time.sleep(1)

    def stop(self) -> None:
        """SIGTERM to the head's `ray start --block` (it ends every node the autoscaler launched); then SIGTERM and
        SIGKILL to anything of this cluster's still running. Raises if something survived."""
        if self.process is None:
            return
        for timer in self.deadlines:
            timer.cancel()
        if self.drainer is not None:
            self.drainer.kill()
            self.drainer.wait()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        left = _stop_processes(self.process.pid, str(self.temp))
        shutil.rmtree(self.temp, ignore_errors=True)
        self.process = None
        assert not left, f"processes of the test cluster survived: {[p.pid for p in left]}"

    def __enter__(self) -> AutoscalingCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ what runs on it

    def client_env(self, **extra: str) -> dict[str, str]:
        """The environment of a process that talks to the cluster (`pear-ray submit`, `ray status`, a driver):
        loopback, token auth on, the token file where Ray looks for it; the token itself is in no variable."""
        return base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file), **extra)

    @property
    def headers(self) -> dict[str, str]:
        """What a Jobs API client sends (JobSubmissionClient(cluster.address, headers=cluster.headers))."""
        return {"authorization": f"Bearer {self.token}"}

    def nodes(self) -> list[Node]:
        """Every node the cluster has had (DEAD ones too), with its type as the autoscaler reported it."""
        status = self._get("/api/cluster_status")["clusterStatus"] or {}
        self.types.update((status.get("autoscalerReport") or {}).get("nodeTypeMapping") or {})
        listed = self._get("/api/v0/nodes?detail=1&limit=1000")["result"]["result"]
        return [Node(node["node_id"], HEAD if node["is_head_node"] else self.types.get(node["node_id"]),
                     node["state"], node["resources_total"]) for node in listed]

    def alive(self, node_type: str) -> list[Node]:
        return [node for node in self.nodes() if node.type == node_type and node.state == "ALIVE"]

    def wait_for_nodes(self, node_type: str, count: int, timeout_s: float = 120) -> list[Node]:
        """Until exactly `count` nodes of the type are alive; returns them."""
        deadline = time.monotonic() + timeout_s
        while len(nodes := self.alive(node_type)) != count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(nodes)} {node_type} nodes alive after {timeout_s:.0f} s, not {count}: "
                                   f"{self.nodes()}")
            time.sleep(0.5)
        return nodes

    def kill_node(self, node_id: str) -> int:
        """Take a node away without notice, as a cloud loses one: SIGKILL to its raylet, its agents and every
        process under them (its workers). Returns how many processes were killed."""
        procs = self._node_processes(node_id)
        assert any("raylet" in " ".join(_cmdline(proc)) for proc in procs), f"no raylet of node {node_id} found"
        _signal(procs, signal.SIGKILL, wait_s=10)
        return len(procs)

    def drain(self, node_id: str, deadline_s: float) -> None:
        """Ray's preemption notice for a node (reason PREEMPTION, with its deadline), then the node killed at the
        deadline, as a cloud reclaims a spot VM (Ray itself never kills a node for its deadline)."""
        if self.drainer is None:
            self.drainer = subprocess.Popen([sys.executable, "-c", DRAINER, self.gcs_address], env=self.client_env(),
                                            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert self.drainer.stdout.readline() == "ready\n"
        self.drainer.stdin.write(f"{node_id} {deadline_s}\n")
        self.drainer.stdin.flush()
        assert (answer := self.drainer.stdout.readline()) == "accepted\n", answer
        self.deadlines.append(threading.Timer(deadline_s, self._node_reclaimed, [node_id]))
        self.deadlines[-1].start()

    def _node_reclaimed(self, node_id: str) -> None:
        _signal(self._node_processes(node_id), signal.SIGKILL, wait_s=10)

    def nodes_running(self, actor_class: str) -> set[str]:
        """The ids of the nodes where an actor of that class lives (its worker process is titled ray::<class>)."""
        return {node.node_id for node in self.nodes() if node.state == "ALIVE"
                and any(" ".join(_cmdline(proc)).startswith(f"ray::{actor_class}")
                        for proc in self._node_processes(node.node_id))}

    def _node_processes(self, node_id: str) -> list[psutil.Process]:
        """A node's raylet and agents (their command lines name the node) and every process under them."""
        procs = [proc for proc in _processes_of(self.process.pid, str(self.temp))
                 if node_id in " ".join(_cmdline(proc))]
        return procs + [child for proc in procs for child in _children(proc)]

    def _get(self, path: str, attempts: int = 3) -> Any:
        """GET from the dashboard, a dropped connection (a busy machine) tried again."""
        request = urllib.request.Request(self.address + path, headers=self.headers)
        for attempt in range(attempts):
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    body = json.loads(response.read())
                return body["data"] if isinstance(body, dict) and "data" in body else body
            except OSError:  # URLError, a reset or closed connection, a timeout
                if attempt + 1 == attempts:
                    raise
                time.sleep(1)


def _processes_of(session_id: int, marker: str) -> list[psutil.Process]:
    """Every process of a head started in session `session_id`: those in that session (its daemons inherit it), those
    whose command line names `marker` (its temp folder), and all their descendants (workers, and a job's supervisor,
    driver and watcher, which start sessions of their own)."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getsid(proc.pid) == session_id or marker in " ".join(proc.info["cmdline"] or []):
                found[proc.pid] = proc
                found.update((child.pid, child) for child in proc.children(recursive=True))
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _stop_processes(session_id: int, marker: str) -> list[psutil.Process]:
    """SIGTERM, then SIGKILL, every process of the head, rescanning until none is left; returns what survived."""
    for _ in range(5):
        procs = _processes_of(session_id, marker)
        if not procs:
            return []
        _signal(_signal(procs, signal.SIGTERM, wait_s=3), signal.SIGKILL, wait_s=5)
    return _processes_of(session_id, marker)


def _signal(procs: list[psutil.Process], signal_number: int, wait_s: float) -> list[psutil.Process]:
    """Send the signal to each process (those gone already are skipped); returns those still alive after wait_s."""
    for proc in procs:
        try:
            proc.send_signal(signal_number)
        except psutil.Error:
            pass
    return psutil.wait_procs(procs, timeout=wait_s)[1]


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []
