"""Workers get the torch threads their Ray resources say, in both console modes.

Ray sets OMP_NUM_THREADS when a worker takes its first task, but torch sizes its thread pool from it when first
imported: under the log-to-files setup hook, which imports pear_ray before any task, every actor of a normal run once
ran two threads on a 2-core box. Each mode runs in a Ray instance of its own, in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = """
import json, sys
from pathlib import Path
import ray
from pear_ray.actors.rollout import RolloutWorker
from pear_ray.config import TransformersOptions
from pear_ray.runtime import init_ray

model, log_dir = sys.argv[1], sys.argv[2]
init_ray(num_cpus=2, log_dir=Path(log_dir) if log_dir else None)

@ray.remote(num_cpus=0.1)
def task_threads():
    import torch
    return torch.get_num_threads()

def actor_threads(num_cpus):
    actor = ray.remote(RolloutWorker).options(num_cpus=num_cpus).remote(model, engine=TransformersOptions())
    return ray.get(actor.health.remote())["torch_threads"]

print(json.dumps({"half": actor_threads(0.5), "most": actor_threads(1.75), "two": actor_threads(2),
                  "task": ray.get(task_threads.remote())}))
"""


@pytest.mark.parametrize("to_files", [pytest.param(True, marks=pytest.mark.slow), False],  # console: the bug's mode
                         ids=["log-to-files", "console"])
def test_actors_and_tasks_get_the_threads_their_cpus_say(tiny_model_dir, tmp_path, to_files):
    log_dir = str(tmp_path / "logs") if to_files else ""
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model_dir), log_dir], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    threads = json.loads(out.stdout.strip().splitlines()[-1])
    assert threads == {"half": 1, "most": 2, "two": 2, "task": 1}  # rounded: 1.75 CPUs leave a task room


def test_a_run_whose_actors_leave_no_cpu_for_rl_s_step_tasks_is_refused_not_left_waiting(ray_cluster):
    """On an embedded instance, RL's scoring and verifier tasks would wait for ever behind a learner that holds every
    CPU (a colocated learner given the whole machine): refused, naming the keys to lower."""
    import ray

    from pear_ray.config import ConfigError
    from pear_ray.stages.rl import room_for_step_tasks

    class Hog:  # defined here, so Ray ships it by value
        def ready(self) -> bool:
            return True

    room_for_step_tasks(0.25)  # the session's instance has room
    hog = ray.remote(num_cpus=ray.available_resources()["CPU"] - 0.1)(Hog).remote()
    try:
        ray.get(hog.ready.remote())
        with pytest.raises(ConfigError, match=r"need 0.25 CPU free .*resources.learner.num_cpus"):
            room_for_step_tasks(0.25)
    finally:
        ray.kill(hog)
