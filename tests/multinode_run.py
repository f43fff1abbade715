"""An infer job on a local multi-node Ray (``ray.cluster_utils.Cluster``): a head and
two workers of different memory. Run as a script by the tests, since a test process
already holds the session's Ray; prints the summary and the nodes as JSON.

Usage: python tests/multinode_run.py MODEL INPUT OUTPUT [--remove-node] [-- k=v ...]

--remove-node takes a worker node away once an actor on it has done some work, mid-job:
its processes are stopped with SIGTERM, as a scaled-down or preempted node's are. (A
raylet killed with SIGKILL instead surfaces in Ray Data as ActorUnavailableError on a
block fetch and fails the job; `--resume` then finishes it.)
"""

from __future__ import annotations

import json
import sys
import threading
import time
import warnings
from dataclasses import asdict

import ray
import ray.data
from helpers import working_actors
from ray.cluster_utils import Cluster

from lmbatch.jobs.infer import run_infer
from lmbatch.jobs.spec import InferSpec, prepare_infer

MIB = 1 << 20
NODES = [  # (CPUs, memory): the head first
    (2, 1024 * MIB),
    (2, 768 * MIB),
    (2, 1536 * MIB),
]


def start_cluster() -> tuple[Cluster, list]:
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
    nodes = [
        cluster.add_node(num_cpus=cpus, memory=memory, object_store_memory=100 * MIB)
        for cpus, memory in workers
    ]
    cluster.wait_for_nodes()
    return cluster, nodes


def remove_a_busy_worker(
    cluster: Cluster, workers: list, removed: list, done: threading.Event
) -> None:
    """Once an actor on a worker node has work, take that node away, its batch in
    flight; give up once the job is ``done``. (Waiting for a finished batch lost
    the race now and then: Ray Data gave a worker's actor as few as 20 of the 1,200
    rows, early or late.)"""
    by_id = {w.node_id: w for w in workers}
    while not removed and not done.is_set():
        on_workers = [a for a in working_actors(started=True) if a["node"] in by_id]
        if on_workers:
            cluster.remove_node(by_id[on_workers[0]["node"]], allow_graceful=True)
            removed.append(on_workers[0]["node"])
            return
        time.sleep(0.05)


def main(model: str, data: str, output: str, *rest: str) -> None:
    remove = "--remove-node" in rest
    flags = dict(kv.split("=", 1) for kv in rest if "=" in kv)
    cluster, workers = start_cluster()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        # Dispatch only once every actor is up, and to any actor with room rather than
        # the one beside the blocks: on a busy 2-core machine the first actor ready,
        # on the node where the reads ran, may otherwise take every batch of so small
        # a job (Ray Data's dispatch, not lmbatch's planning, which is what this
        # checks).
        context = ray.data.DataContext.get_current()
        context.wait_for_min_actors_s = 120
        with warnings.catch_warnings():  # deprecated in 2.60, still honoured
            warnings.simplefilter("ignore")
            context.execution_options.actor_locality_enabled = False
        task = flags.get("task", "embed")
        generate = {"max_new_tokens": int(flags.get("max_new_tokens", 8))}
        spec = InferSpec(
            model=model,
            inputs=(data,),
            task=task,
            output=output,
            id_column=flags.get("id_column"),
            batch_rows=int(flags.get("batch_rows", 8)),  # every actor gets some
            **(generate if task == "generate" else {}),
        )
        removed: list[str] = []
        done = threading.Event()
        remover = threading.Thread(
            target=remove_a_busy_worker, args=(cluster, workers, removed, done)
        )
        if remove:
            remover.start()
        try:
            summary = run_infer(prepare_infer(spec))
        finally:
            # Stopped before Ray is: its next call would start a Ray of its own, and
            # the failure then would hide the job's.
            done.set()
            if remover.is_alive():
                remover.join()
        nodes = {
            n["NodeID"]: n["Resources"].get("memory") for n in ray.nodes() if n["Alive"]
        }
        print(
            json.dumps({"summary": asdict(summary), "nodes": nodes, "removed": removed})
        )
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
