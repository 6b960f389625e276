"""The node provider of the local autoscaling cluster (tests/support/autoscaling.py): Ray's fake multi-node provider,
except that a node whose raylet is gone (a drill killed it, at a preemption's deadline or without notice) is no
longer listed, as a cloud's provider stops listing a reclaimed VM. The fake provider keeps listing such a node, so
the autoscaler would count it as capacity still coming up and never launch the replacement a job waits for.

Loaded by the autoscaler inside the head (provider type `external`, this folder alone on its PYTHONPATH), not by tests.
"""

from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class ReclaimableFakeProvider(FakeMultiNodeProvider):
    def non_terminated_nodes(self, tag_filters):
        with self.lock:
            for node_id, node in list(self._nodes.items()):
                if "node" in node and any(name == "raylet" for name, _ in node["node"].dead_processes()):
                    del self._nodes[node_id]
                    node["node"].kill_all_processes(check_alive=False, allow_graceful=False)  # what is left of it
            return super().non_terminated_nodes(tag_filters)
