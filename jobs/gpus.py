"""Where a job's model runs, on how many GPUs, and how many actors share each one.

Shared by ``infer`` (the actor pool), ``serve`` (the replicas) and ``optimize`` (its
one task): all ask for GPUs the same way, from the cluster's GPUs now and those its
autoscaler can add (``jobs/cluster.py``), and pack them by the model's footprint read
off its weight files.
"""

from __future__ import annotations

import logging

import ray

from lmbatch.actors.footprint import (
    footprint_precision,
    gpu_total_bytes,
    model_bytes,
)
from lmbatch.actors.model_info import CPU_ONLY_PRECISIONS, ModelInfo
from lmbatch.errors import UserError
from lmbatch.jobs.cluster import GpuView
from lmbatch.jobs.pool import actors_per_gpu

log = logging.getLogger("lmbatch")
NO_GPU = "the cluster has no GPU, and no node type of its autoscaler has one"


def choose_device(
    asked: str,
    precision: str,
    info: ModelInfo,
    view: GpuView,
    gpu_flags: dict[str, object] | None = None,
) -> str:
    """cuda or cpu. ``auto`` takes GPUs where the cluster has them or its autoscaler
    can add them, unless the model runs on CPU kernels only (cpu-int8, a cpu-int8
    artifact).

    Args:
        gpu_flags: flags that size a pool of GPUs (``--gpus``), by name; one given
            (not None) asks for GPUs, so a pool on CPU would ignore it.

    Raises:
        UserError: naming ``--device`` when cuda is asked of a cluster that can have
            no GPU, or a GPU flag given for a pool that runs on CPU.
    """
    if asked == "cuda" and not view.most:
        raise UserError("--device", f"cuda asked for; {NO_GPU}")
    cpu_only = precision in CPU_ONLY_PRECISIONS or info.cpu_only
    if asked != "cpu" and view.most and not cpu_only:
        return "cuda"
    given = [flag for flag, value in (gpu_flags or {}).items() if value is not None]
    if given:
        raise UserError(
            given[0],
            "applies to a pool of GPUs; this one runs on CPU: "
            + _on_cpu_because(asked, precision, info),
        )
    return "cpu"


def _on_cpu_because(asked: str, precision: str, info: ModelInfo) -> str:
    if asked == "cpu":
        return "--device cpu"
    if precision in CPU_ONLY_PRECISIONS:
        return f"--precision {precision} runs on CPU kernels"
    if info.cpu_only:
        return "the artifact's layers run on CPU kernels"
    return NO_GPU


def pool_gpus(asked: int | None, view: GpuView) -> int:
    """GPUs the pool spreads over: ``--gpus``, else every GPU alive now, else one
    (which the autoscaler starts).

    Raises:
        UserError: naming ``--gpus`` when the cluster can never have that many.
    """
    gpus = asked or view.now or 1
    if gpus > view.most:
        raise UserError(
            "--gpus", f"{gpus} GPUs asked for; the cluster can have at most {view.most}"
        )
    return gpus


def per_gpu(
    model_dir: str, info: ModelInfo, precision: str, asked: int | None, view: GpuView
) -> int:
    """Actors (or replicas) per GPU: ``asked``, or as many as fit the model's
    footprint in the smallest GPU the pool can land on: its memory as the node types
    declare it, else as one GPU of the cluster says (a task that loads nothing)."""
    gpu_bytes = view.memory_bytes
    if gpu_bytes is None:
        if not view.now:
            log.info("asking a GPU its size: the autoscaler may be starting a node")
        ask = ray.remote(num_gpus=1, num_cpus=0)(gpu_total_bytes)
        gpu_bytes = ray.get(ask.remote())
    if not gpu_bytes:  # the GPU node has no CUDA: its actors will run on CPU
        log.warning("a GPU node of this cluster finds no CUDA; one actor per GPU")
        return asked or 1
    held = footprint_precision(info.precision, precision, "cuda")
    weights = model_bytes(model_dir, held, "cuda")
    return actors_per_gpu(weights, gpu_bytes, asked)


def planned_precision(info: ModelInfo, precision: str, device: str) -> str:
    """The precision a job's weights will be held in, as far as the launcher can
    know it before any actor runs (the dry run): the model's own (an artifact's, or
    bitsandbytes' stored one), the one asked for, or auto made concrete where the
    device decides it."""
    if info.precision not in (None, "fp32"):
        return f"{info.precision} (the model's own)"
    if precision != "auto":
        return precision
    if device == "cpu":
        return "fp32 (auto on CPU)"
    return "bf16, or fp16 on GPUs older than Ampere (auto)"
