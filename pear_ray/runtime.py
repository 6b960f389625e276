"""Starting or joining Ray with the environment every pear_ray worker needs.

The variables below are read at import time by vLLM, DeepSpeed and torch, so they are set for every
worker through the job's runtime environment rather than inside actors.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
from pathlib import Path

# Read by Ray at import time: keeps the embedded instance's sockets on 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
import ray  # noqa: E402

from pear_ray import faults  # noqa: E402

log = logging.getLogger(__name__)

# Measured on CPU: vLLM in-process with no CPU pinning and no C++ compile on first logprobs call;
# DeepSpeed on the CPU accelerator.
WORKER_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "TORCHDYNAMO_DISABLE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "WARNING",  # vLLM's per-engine INFO lines drown the driver's own log
    # Weights cross the object store as buffers, not pickled: a 0.5B sync 10-27x faster here. A tensor received so is
    # read-only; every consumer (the engines' reloads, load_state_dict, peft's adapter loading) copies from it.
    "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1",
}
CPU_ONLY_ENV = {"DS_ACCELERATOR": "cpu"}
# Idle task workers an embedded instance keeps (Ray's default: one per CPU). RL's scoring, cut and verifier tasks
# need a few workers at once; with only two kept, Ray ended the others when idle and started them again a step later,
# each import of torch and transformers costing seconds of a core (a 30-step RL run on 2 cores started 61 workers, and
# stalled for 10-20 s at a time under load; keeping 8 it started 12).
IDLE_TASK_WORKERS = 8
_embedded = {"started": False}  # whether this process started its own Ray instance, which never grows
LOOPBACK = "127.0.0.1"
VERBOSE_ENV = "PEAR_RAY_VERBOSE"  # set (by `pear-ray --verbose`): workers' output goes to the console too
WORKER_LOGS_ENV = "PEAR_RAY_WORKER_LOGS"  # the folder workers write their output into otherwise


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Environment for every worker: user settings win over ours; an armed kill point (faults.py) travels too."""
    wanted = {**WORKER_ENV, **({} if use_gpu else CPU_ONLY_ENV)}
    return {**{key: os.environ.get(key, value) for key, value in wanted.items()}, **faults.job_env()}


def worker_logs_to_files() -> None:
    """Ray's worker_process_setup_hook: this worker's stdout and stderr (vLLM, DeepSpeed, torch, C++ included)
    go to <folder>/worker-<pid>.log instead of Ray's log files, which Ray would stream to the driver's console."""
    folder = Path(os.environ[WORKER_LOGS_ENV])
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"worker-{os.getpid()}.log", "ab", buffering=0) as file:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
            os.dup2(file.fileno(), stream.fileno())


def use_assigned_cpus() -> int:
    """Size torch's thread pool to the CPUs Ray gave this actor (rounded, at least one thread), and return it. Call it in
    an actor's constructor, before its engine starts (vLLM's CPU worker forbids changing it afterwards): Ray only
    sets OMP_NUM_THREADS, which torch has already read if anything imported it earlier in the worker, and then every
    actor on a 2-core box runs two threads and fights the others for the cores. Outside a Ray worker, a no-op."""
    import torch

    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        return torch.get_num_threads()
    threads = max(1, math.floor(context.get_assigned_resources().get("CPU", 1.0) + 0.5))  # 1.75 CPUs: 2 threads
    torch.set_num_threads(threads)
    return threads


def check_reachable(address: str) -> None:
    """Fail at once, naming the address, when nothing listens there: Ray itself retries for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and the like: Ray resolves those itself
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as error:
        raise ConnectionError(f"no Ray cluster answers at {address} (RAY_ADDRESS): {error.strerror or error}") from None


def init_ray(address: str | None = None, *, num_cpus: float | None = None, use_gpu: bool = False,
             log_dir: Path | None = None, **ray_kwargs) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), or start an embedded one bound to loopback only
    (`ray_kwargs`, e.g. object_store_memory, go to that embedded instance). With `log_dir`, the workers' output
    goes to files there rather than to the console, unless PEAR_RAY_VERBOSE is set.

    A no-op when Ray is already initialised, so tests and the driver can share one instance.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": worker_env(use_gpu)}
    os.environ.update(runtime_env["env_vars"])  # the driver imports the same libraries
    # Workers only: a task (verifiers, RL's scoring and cut, data reads) runs one torch thread however Ray reuses
    # its process, and each actor raises its own to its CPUs (use_assigned_cpus); the driver keeps the machine's.
    runtime_env["env_vars"].setdefault("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    to_console = log_dir is None or bool(os.environ.get(VERBOSE_ENV))
    if not to_console:
        runtime_env["env_vars"][WORKER_LOGS_ENV] = str(Path(log_dir).resolve())
        runtime_env["worker_process_setup_hook"] = f"{__name__}.{worker_logs_to_files.__name__}"
        log.info("actor and engine logs: %s", log_dir)
    if address:
        log.info("joining Ray cluster at %s", address)
        check_reachable(address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=to_console)
        return
    log.info("starting an embedded Ray instance on %s", LOOPBACK)
    _embedded["started"] = True
    kept = max(IDLE_TASK_WORKERS, int(num_cpus or os.cpu_count() or 1))
    ray.init(
        num_cpus=num_cpus,
        _node_ip_address=LOOPBACK,
        include_dashboard=False,
        runtime_env=runtime_env,
        log_to_driver=to_console,
        _system_config={"num_workers_soft_limit": kept},
        **ray_kwargs,
    )


def free_cpus_short_of(cpus: float) -> tuple[float, bool] | None:
    """None when the cluster has `cpus` CPUs free now; else (the CPUs free, whether it can never get more: an embedded
    instance started by this driver, not a cluster whose autoscaler may add a node)."""
    free = ray.available_resources().get("CPU", 0.0)
    return None if free >= cpus else (free, _embedded["started"])


def actor_options(resources) -> dict:
    """Ray options for one actor of a role (config.ActorResources): CPUs, GPUs and custom resources, which is
    how a cluster puts rollout and learner actors on their own node groups."""
    return {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus, "resources": dict(resources.resources)}
