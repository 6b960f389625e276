"""Join one more raylet (a "node") to a running Ray head on this machine, all on 127.0.0.1, until SIGTERM.

`ray start --address=...` cannot do this on Linux without leaving loopback: it rewrites 127.0.0.1 (in --address
and --node-ip-address) to the machine's external IP, and refuses to join at all under
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0. Ray's own test clusters (ray.cluster_utils.Cluster.add_node) start extra
nodes on one machine through ray._private.node.Node; so does this script, in a process of its own so a test
can take the node away the way a cluster loses one (its raylet and workers die).

usage: python ray_worker_node.py GCS_ADDRESS TEMP_DIR NUM_CPUS RESOURCES_JSON
Prints "NODE_ID <hex>" once the node has joined; SIGTERM kills the node's processes and exits.
"""

import json
import signal
import sys
import threading

from ray._private.node import Node
from ray._private.parameter import RayParams


def main() -> None:
    gcs_address, temp_dir, num_cpus, resources = sys.argv[1:5]
    params = RayParams(
        gcs_address=gcs_address,
        node_ip_address="127.0.0.1",
        num_cpus=float(num_cpus),
        resources=json.loads(resources),
        object_store_memory=128 * 1024**2,
        temp_dir=temp_dir,
        node_manager_port=0,
        dashboard_agent_listen_port=None,  # let the agent pick a free port: the head's is taken
        include_log_monitor=False,
        min_worker_port=0,
        max_worker_port=0,
    )
    node = Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
    print("NODE_ID", node.node_id, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)


if __name__ == "__main__":
    main()
