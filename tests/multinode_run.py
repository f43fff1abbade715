"""An infer job on a local multi-node Ray (``ray.cluster_utils.Cluster``): a head and
two workers of different memory. Run as a script by test_multinode.py, since a test
process already holds the session's Ray; prints the summary and the nodes as JSON.

Usage: python tests/multinode_run.py MODEL INPUT OUTPUT
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import ray
from ray.cluster_utils import Cluster

from jobs.infer import run_infer
from jobs.spec import InferSpec, prepare_infer

MIB = 1 << 20
NODES = [  # (CPUs, memory): the head first
    (2, 1024 * MIB),
    (2, 768 * MIB),
    (2, 1536 * MIB),
]


def main(model: str, data: str, output: str) -> None:
    (head_cpus, head_memory), *workers = NODES
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": head_cpus,
            "memory": head_memory,
            "object_store_memory": 100 * MIB,
            "include_dashboard": False,
        },
    )
    try:
        for cpus, memory in workers:
            cluster.add_node(
                num_cpus=cpus, memory=memory, object_store_memory=100 * MIB
            )
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        spec = InferSpec(
            model=model,
            inputs=(data,),
            task="embed",
            output=output,
            id_column="doc",
            batch_rows=8,  # many small calls, so that every actor gets some
        )
        summary = run_infer(prepare_infer(spec))
        nodes = {
            n["NodeID"]: n["Resources"].get("memory") for n in ray.nodes() if n["Alive"]
        }
        print(json.dumps({"summary": asdict(summary), "nodes": nodes}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
