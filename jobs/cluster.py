"""What a job can have of the cluster's GPUs: those alive now, and those its autoscaler
can add.

Node types come from Ray's own view of the cluster: the cluster config the autoscaler
reports to the GCS (autoscaler v2, KubeRay), or else the autoscaling config file the
head's autoscaler (monitor) runs with, found from its command line where this driver
runs on the head, as a job submitted to the cluster does. Without either, only the
nodes alive now count.

A GPU node type may declare its GPUs' memory as a resource ``gpu_<N>gb`` (one per GPU,
as cluster.yaml does): pools are sized for the smallest GPU they can land on.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import psutil
import ray
import yaml

log = logging.getLogger("lmbatch")
GPU_MEMORY = re.compile(r"gpu_(\d+)gb")


@dataclass(frozen=True)
class NodeType:
    """One kind of node: a node type of the autoscaler, or a node alive now."""

    name: str
    resources: dict[str, float]  # one node's
    max_count: int  # nodes of it the cluster may have at most


@dataclass(frozen=True)
class GpuView:
    now: int  # GPUs alive now
    most: int  # GPUs the cluster can have, counting what its autoscaler can add
    memory_bytes: int | None  # of the smallest GPU, where every GPU type declares it
    smallest: str  # the node type that smallest GPU is on
    cpus_per_gpu: float  # CPUs per GPU of the GPU node with the fewest

    def describe(self) -> str:
        if self.memory_bytes is None:
            return f"{self.now} GPUs now, up to {self.most}"
        return (
            f"{self.now} GPUs now, up to {self.most}; sized for the smallest, "
            f"{self.memory_bytes / 1e9:.0f} GB ({self.smallest})"
        )


def gpu_view() -> GpuView:
    """The cluster's GPUs, now and at most, from live nodes and node types."""
    live = [
        NodeType(n["NodeID"][:8], n["Resources"], 1)
        for n in ray.nodes()
        if n["Alive"] and n["Resources"].get("GPU")
    ]
    typed = [t for t in node_types() if t.resources.get("GPU")]
    now = int(sum(k.resources["GPU"] for k in live))
    most = int(sum(t.resources["GPU"] * t.max_count for t in typed))
    kinds = live + typed
    declared = [(_declared_memory(k.resources), k.name) for k in kinds]
    known = bool(kinds) and all(m is not None for m, _ in declared)
    memory, smallest = min(declared) if known else (None, "")
    return GpuView(
        now=now,
        most=max(now, most),
        memory_bytes=memory,
        smallest=smallest,
        cpus_per_gpu=min(
            (k.resources.get("CPU", 0) / k.resources["GPU"] for k in kinds),
            default=0.0,
        ),
    )


def node_types() -> list[NodeType]:
    """The autoscaler's node types that may have workers, or [] where none is known."""
    import ray._private.state

    reported = ray._private.state.state.get_cluster_config()
    if reported is not None and reported.node_group_configs:
        return [
            NodeType(g.name, dict(g.resources), g.max_count)
            for g in reported.node_group_configs
            if g.max_count != 0
        ]
    config = _monitor_config(ray.get_runtime_context().gcs_address)
    types = (config or {}).get("available_node_types", {})
    return [
        NodeType(name, dict(t.get("resources", {})), int(t.get("max_workers", 0)))
        for name, t in types.items()
        if name != config.get("head_node_type") and t.get("max_workers", 0)
    ]


def _monitor_config(gcs_address: str) -> dict | None:
    """The autoscaling config of the monitor serving ``gcs_address``, if it runs on
    this machine (it runs on the head)."""
    port = gcs_address.rsplit(":", 1)[-1]
    for process in psutil.process_iter(["cmdline", "cwd"]):
        args = process.info["cmdline"] or []
        if not any(a.endswith("autoscaler/_private/monitor.py") for a in args):
            continue
        flags = dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)
        if flags.get("--gcs-address", "").rsplit(":", 1)[-1] != port:
            continue
        path = flags.get("--autoscaling-config")
        if not path:
            return None
        file = Path(process.info["cwd"] or "/", os.path.expanduser(path))
        try:
            return yaml.safe_load(file.read_text())
        except (OSError, yaml.YAMLError) as e:
            log.warning("cannot read the autoscaler's config %s: %s", file, e)
            return None
    return None


def _declared_memory(resources: dict[str, float]) -> int | None:
    sizes = [int(m.group(1)) for r in resources if (m := GPU_MEMORY.fullmatch(r))]
    return min(sizes) * 10**9 if sizes else None  # GB: below what the GPU has
