"""An elastic pool on a cluster that Ray's own autoscaler sizes (tests/support/autoscaling.py: the fake multi-node
provider, the node types of cluster/node_types.yaml): the rollout type scales from zero, the scaler's request for one
more actor has the autoscaler launch a `rollout` node that the new actor starts on, and the actor it releases leaves
its node idle, which the autoscaler then removes, as it removes the last one once the request is withdrawn.

The driver runs in a process of its own (this one may hold the session's embedded Ray instance) and says what it
did, an EVENT line at a time; the test checks the cluster between its steps.
"""

import json
import subprocess
import sys

import pytest
from support.autoscaling import AutoscalingCluster

DRIVER = """
import json, sys, time
import ray
from pear_ray.actors.elastic import PoolScaler
from pear_ray.actors.roles import rollout_pool
from pear_ray.config import PoolScaling, RolloutResources
from pear_ray.runtime import init_ray

def say(event, **figures):
    print("EVENT", json.dumps({"event": event, **figures}), flush=True)
    assert sys.stdin.readline().strip() == "go on"

init_ray(sys.argv[1])
resources = RolloutResources(num_actors=1, max_actors=2, num_cpus=1, resources={"rollout": 1},
                             engine={"backend": "transformers"}, scale=PoolScaling(by="wait", window=1))
pool = rollout_pool(sys.argv[2], resources, seed=0)
ray.get(pool.slots[0].ready)
scaler = PoolScaler(pool, resources, "test")
say("started", actors=len(pool.actors), requested=scaler.requested)
scaler.decide(1.0, 1.0)  # the consumer waited on the pool the whole step: one more actor's room is asked for
while not scaler.grow():
    time.sleep(0.2)
on_node = lambda worker: ray.get_runtime_context().get_node_id()  # noqa: E731
nodes = {ray.get(member.actor.__ray_call__.remote(on_node)) for member in pool.slots.values()}
say("grew", actors=len(pool.actors), requested=scaler.requested, nodes=len(nodes),
    seconds=scaler.scale_up_seconds[0])
scaler.decide(0.0, 0.0)  # the pool sat idle: one actor is released
scaler.grow()  # it had no work in flight: it leaves now
say("released", actors=len(pool.actors), requested=scaler.requested, slots=sorted(pool.slots))
scaler.close()
pool.shutdown()
say("closed")
"""


@pytest.fixture(scope="module")
def cluster():
    with AutoscalingCluster(head_cpus=1, max_workers={"rollout": 2, "learner": 0}) as cluster:
        yield cluster


def test_the_autoscaler_launches_a_node_for_the_actor_asked_for_and_removes_the_released_ones(cluster,
                                                                                             tiny_model_dir):
    assert [node.type for node in cluster.nodes()] == ["head"]  # workers scale from zero
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, cluster.gcs_address, str(tiny_model_dir)],
                              env=cluster.client_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def next_event(expected: str) -> dict:
        """The driver's next EVENT line (Ray writes lines of its own too)."""
        while not (line := driver.stdout.readline()).startswith("EVENT "):
            assert line, f"the driver ended before {expected!r} (exit {driver.wait(timeout=60)})"
        event = json.loads(line.removeprefix("EVENT "))
        assert event["event"] == expected, event
        return event

    def go_on() -> None:
        driver.stdin.write("go on\n")
        driver.stdin.flush()

    try:
        assert next_event("started") == {"event": "started", "actors": 1, "requested": 1}
        [first] = cluster.wait_for_nodes("rollout", 1)  # launched for the pending actor's {rollout: 1}
        assert first.resources["rollout"] == 1 and first.resources.get("GPU", 0) == 0
        go_on()
        grew = next_event("grew")
        assert (grew["actors"], grew["requested"], grew["nodes"]) == (2, 2, 2)  # the new actor is on a new node
        assert 0 < grew["seconds"] < 120
        assert len(cluster.alive("rollout")) == 2
        go_on()
        assert next_event("released") == {"event": "released", "actors": 1, "requested": 1, "slots": [0]}
        cluster.wait_for_nodes("rollout", 1)  # the released actor's node went idle and was removed
        go_on()
        next_event("closed")
        cluster.wait_for_nodes("rollout", 0)  # the request withdrawn and the pool gone: no rollout node is left
        go_on()
        assert driver.wait(timeout=60) == 0
    finally:
        driver.kill()
    launched = {node.node_id for node in cluster.nodes() if node.type == "rollout"}
    assert len(launched) == 2  # no node was launched beyond the two asked for
