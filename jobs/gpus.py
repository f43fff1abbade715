"""Where a job's model runs, and how many of its actors share one GPU.

Shared by ``infer`` (the actor pool) and ``serve`` (the replicas): both ask for GPUs
the same way and pack them by the model's footprint, read off its weight files.
"""

from __future__ import annotations

import ray

from lmbatch.actors.footprint import gpu_total_bytes, model_bytes
from lmbatch.actors.model_info import CPU_ONLY_PRECISIONS, ModelInfo
from lmbatch.errors import UserError
from lmbatch.jobs.pool import actors_per_gpu


def choose_device(asked: str, precision: str, info: ModelInfo, gpus: float) -> str:
    """cuda or cpu. ``auto`` takes GPUs where the cluster has them, unless the model
    runs on CPU kernels only (cpu-int8, a cpu-int8 artifact).

    Raises:
        UserError: naming ``--device`` when cuda is asked of a cluster without GPUs.
    """
    if asked == "cuda" and not gpus:
        raise UserError("--device", "cuda asked for; the cluster has no GPU")
    cpu_only = precision in CPU_ONLY_PRECISIONS or info.cpu_only
    if asked == "cpu" or not gpus or cpu_only:
        return "cpu"
    return "cuda"


def per_gpu(model: str, info: ModelInfo, precision: str, asked: int | None) -> int:
    """Actors (or replicas) per GPU: ``asked``, or as many as fit the model's
    footprint; the GPU's size is asked of one GPU of the cluster, nothing loaded."""
    ask = ray.remote(num_gpus=1, num_cpus=0)(gpu_total_bytes)
    weights = model_bytes(model, footprint_precision(info, precision), "cuda")
    return actors_per_gpu(weights, ray.get(ask.remote()), asked)


def footprint_precision(info: ModelInfo, precision: str) -> str:
    """The precision the weights will take on a GPU: an artifact's own, or the one
    asked for; auto is bf16 or fp16, two bytes a weight either way."""
    if info.precision not in (None, "fp32", "mixed"):
        return info.precision
    return "fp16" if precision == "auto" else precision
