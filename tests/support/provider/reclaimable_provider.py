"""The node provider of the local autoscaling cluster (tests/support/autoscaling.py): Ray's fake multi-node provider,
with two differences that make its nodes behave as a cloud's do:

- a node whose raylet is gone (a drill killed it, at a preemption's deadline or without notice) is no longer listed,
  as a cloud's provider stops listing a reclaimed VM. The fake provider keeps listing such a node, so the autoscaler
  would count it as capacity still coming up and never launch the replacement a job waits for;
- each node unpacks a job's working_dir into a folder of its own. The fake nodes share the head's session folder, and
  a node's runtime-env agent replaces an unpacked working_dir it has not set up itself (Ray's WorkingDirPlugin.create
  unpacks with overwrite=True), deleting it from under the workers of the other nodes that run in it: a task worker
  started after that cannot even import transformers (its working directory is gone). On a cloud every node has its
  own disk;
- with NODE_DISKS_ENV set (in the head's environment), each node's pear_ray scratch folder is a folder of its own
  under it (PEAR_RAY_SCRATCH=<it>/node<N>), as each cloud node caches a run folder in a bucket on its own disk.

Loaded by the autoscaler inside the head (provider type `external`, this folder alone on its PYTHONPATH), not by tests.
"""

import os

import ray._private.parameter
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

NODE_DISKS_ENV = "PEAR_RAY_TEST_NODE_DISKS"


class ReclaimableFakeProvider(FakeMultiNodeProvider):
    def non_terminated_nodes(self, tag_filters):
        with self.lock:
            for node_id, node in list(self._nodes.items()):
                if "node" in node and any(name == "raylet" for name, _ in node["node"].dead_processes()):
                    del self._nodes[node_id]
                    node["node"].kill_all_processes(check_alive=False, allow_graceful=False)  # what is left of it
            return super().non_terminated_nodes(tag_filters)

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        with self.lock:  # the parent builds its RayParams from the module: given folders of the node's own
            params = ray._private.parameter.RayParams
            number = self._next_node_id + 1

            def own_params(*, env_vars, **kwargs):
                if disks := os.environ.get(NODE_DISKS_ENV):
                    env_vars = {**env_vars, "PEAR_RAY_SCRATCH": f"{disks}/node{number}"}
                return params(runtime_env_dir_name=f"runtime_resources_node{number}", env_vars=env_vars, **kwargs)

            ray._private.parameter.RayParams = own_params
            try:
                super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
            finally:
                ray._private.parameter.RayParams = params
