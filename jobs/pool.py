"""How big the actor pool is and what each actor reserves, from the cluster's resources.

CPU and GPU counts come from ``ray.cluster_resources()``, never from a constant.
On CPU, the pool leaves one CPU to the read and tokenize tasks; a pool that reserves
every CPU starves them and the job hangs (seen on 2 cores with 2 actors of 1 CPU). Each
actor still runs ``threads`` torch threads: the cores it shares with the readers are
idle whenever the readers are ahead, which is most of the time.

On GPUs, each actor asks for the fraction of a GPU that its model's footprint (read
off the weight files, ``actors/footprint.py``) plus an equal batch reserve takes, so
an 8-bit model packs about twice as many actors per GPU as fp16. The whole pool starts
at once: several actors per GPU keep it busy while each one does its host work. The
actors of one GPU share one reserved CPU: they mostly wait on the GPU, and every CPU
they do not reserve is one more tokenize task feeding them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmbatch.actors.footprint import GPU_USABLE
from lmbatch.errors import UserError

CPU_THREADS_PER_ACTOR = 4  # torch scales well to about 4 threads on small models
IO_CPUS = 1.0  # kept free for read and tokenize tasks
MIN_ACTOR_CPUS = 0.25
MIN_BATCH_RESERVE = 1 << 30  # activations of one micro-batch, at the least
# More actors than this on one GPU cost more than they overlap: on an H200, MiniLM
# over 1M rows with 8 actors (what its footprint allows) had them ready 22.7 s into
# the job and their model time summed to 108 s, as 8 processes took turns on the GPU;
# with 2, ready at 17.6 s, 40 s of model time, and the job 46.6 s against 59.8 s.
# Two are enough to overlap one's host work with the other's GPU work.
MAX_ACTORS_PER_GPU = 2
# CPUs reserved for the host side of all the actors on one GPU. An actor's host work is
# about 7 ms per 8,192-row call (benchmarks/host_feed.py); the rest of the time it waits
# on its GPU. With a whole CPU per actor, Ray Data's resource allocator ran at most 4
# tokenize tasks at once for 8 actors on a 16-CPU GPU node; with one CPU per GPU, 11
# (benchmarks/gpu_node_schedule.py).
GPU_HOST_CPUS = 1.0
# Rows handed to an actor per call: on CPU a call of 1,024 rows keeps blocks small;
# a GPU runs thousands of rows in one micro-batch, and fewer calls mean less of Ray's
# per-call overhead between them.
ROWS_PER_CALL = {"cpu": 1024, "cuda": 8192}


@dataclass(frozen=True)
class PoolPlan:
    min_actors: int
    max_actors: int
    num_cpus: float  # reserved per actor
    num_gpus: float  # reserved per actor
    threads: int  # torch intra-op threads per actor
    memory: int | None = None  # bytes of Ray's memory resource per actor (CPU)
    device: str = "cpu"  # cuda: each actor holds num_gpus of a GPU
    gpus: int = 0  # GPUs the pool spreads over (cuda)

    def describe(self) -> str:
        if self.device == "cuda":
            per = round(1 / self.num_gpus) if self.num_gpus else 0
            return f"{self.max_actors} GPU actors, {per} per GPU, on {self.gpus} GPUs"
        return f"{self.max_actors} CPU actors of {self.threads} threads"

    @property
    def rows_per_call(self) -> int:
        return ROWS_PER_CALL[self.device]


def actors_per_gpu(model_bytes: int, gpu_bytes: int, asked: int | None = None) -> int:
    """How many actors share one GPU: ``asked``, or as many as fit weights + reserve.

    Raises:
        UserError: naming ``--actors-per-gpu`` when not even one actor fits.
    """
    need = model_bytes + max(model_bytes, MIN_BATCH_RESERVE)
    fits = int(gpu_bytes * GPU_USABLE // need)
    if asked is not None:
        if asked > max(fits, 1):
            raise UserError(
                "--actors-per-gpu",
                f"{asked} actors of {need / 2**30:.1f} GiB "
                f"do not fit a {gpu_bytes / 2**30:.0f} GiB GPU; at most {fits}",
            )
        return asked
    if fits < 1:
        raise UserError(
            "--precision",
            f"the model needs {need / 2**30:.1f} GiB with its batch "
            f"reserve; the GPU has {gpu_bytes / 2**30:.0f} GiB: try int8 or nf4",
        )
    return min(fits, MAX_ACTORS_PER_GPU)


def gpu_fraction(per_gpu: int) -> float:
    """The ``num_gpus`` each of ``per_gpu`` actors on one GPU asks for."""
    return _floor4(1 / per_gpu)


def _floor4(share: float) -> float:
    """Ray counts resources to 1e-4: rounded down, so that every share fits."""
    return math.floor(share * 1e4 + 1e-9) / 1e4


def plan_pool(
    resources: dict[str, float],
    actors: tuple[int, int] | None,
    per_gpu: int = 1,
    actor_memory: int | None = None,
    node_cpus: list[float] | None = None,
    ray_cpus: float = 0.0,
    device: str = "cpu",
    gpus: int = 0,
    cpus_per_gpu: float = 1.0,
) -> PoolPlan:
    """Size the pool for a cluster with ``resources`` (as ``ray.cluster_resources()``).

    Args:
        per_gpu: actors sharing each GPU (``actors_per_gpu``); cuda only.
        actor_memory: bytes each CPU actor may use (``--actor-memory``).
        node_cpus: CPUs of each node; default one node with all of them.
        ray_cpus: CPUs Ray Data's own actors take (1 for the checkpoint filter of a
            resumed job); the pool reserves less, down to nothing, and its actors
            share cores instead of starving the reads.
        device: cuda for a pool of GPU actors, cpu otherwise.
        gpus: GPUs the pool spreads over (cuda; some may still be starting).
        cpus_per_gpu: CPUs per GPU of the GPU node with the fewest (cuda).

    Raises:
        UserError: naming ``--actors`` or ``--actor-memory`` when the pool cannot fit.
    """
    cpus = float(resources.get("CPU", 0))
    if cpus < 2:
        raise UserError(
            "cluster", f"needs at least 2 CPUs (one for reading), has {cpus:g}"
        )
    if device == "cuda":
        lo, hi = actors or (gpus * per_gpu, gpus * per_gpu)
        if hi > gpus * per_gpu:
            raise UserError(
                "--actors",
                f"{hi} actors at {per_gpu} per GPU; the pool has {gpus} GPUs (--gpus)",
            )
        share = gpu_fraction(per_gpu)
        spare = max(0.0, cpus - IO_CPUS - ray_cpus) / hi
        num_cpus = min(_floor4(min(GPU_HOST_CPUS, cpus_per_gpu) / per_gpu), spare)
        return PoolPlan(
            lo, hi, num_cpus, num_gpus=share, threads=1, device="cuda", gpus=gpus
        )
    return _plan_cpu_pool(
        resources, actors, actor_memory, node_cpus or [cpus], cpus - IO_CPUS, ray_cpus
    )


def _plan_cpu_pool(
    resources: dict[str, float],
    actors: tuple[int, int] | None,
    actor_memory: int | None,
    node_cpus: list[float],
    usable: float,
    ray_cpus: float,
) -> PoolPlan:
    """One actor per ``CPU_THREADS_PER_ACTOR`` CPUs of each node by default.

    Every actor reserves the same CPUs (Ray Data's pool is uniform), sized so that
    each node holds its share and one node still has ``IO_CPUS`` whole for the read
    and tokenize tasks: on a cluster, spare CPU split over nodes reads nothing.
    """
    if actors is None:
        hi = sum(max(1, int(n) // CPU_THREADS_PER_ACTOR) for n in node_cpus)
        if actor_memory:
            hi = max(1, min(hi, int(resources.get("memory", 0) // actor_memory)))
        actors = (hi, hi)
    lo, hi = actors
    if hi > usable / MIN_ACTOR_CPUS:
        raise UserError(
            "--actors",
            f"{hi} actors would leave no CPU for reading; "
            f"at most {int(usable / MIN_ACTOR_CPUS)} fit",
        )
    if actor_memory and hi * actor_memory > resources.get("memory", 0):
        raise UserError(
            "--actor-memory",
            f"{hi} actors of {actor_memory / 2**30:.2f} GiB "
            f"exceed the cluster's {resources.get('memory', 0) / 2**30:.1f} GiB",
        )
    share = _spread(node_cpus, hi)  # actors each node is to hold
    threads = max(
        1, min(int(n // a) for n, a in zip(node_cpus, share, strict=True) if a)
    )
    spare = IO_CPUS + ray_cpus
    reserve = min(
        float(threads),
        (usable - ray_cpus) / hi,
        max((n - spare) / a for n, a in zip(node_cpus, share, strict=True) if a),
    )
    # Ray Data's own actors may leave nothing to reserve: then share, not starve.
    reserve = max(0.0, reserve) if ray_cpus else max(MIN_ACTOR_CPUS, reserve)
    return PoolPlan(
        lo,
        hi,
        num_cpus=reserve,
        num_gpus=0.0,
        threads=threads,
        memory=actor_memory,
    )


def _spread(node_cpus: list[float], actors: int) -> list[int]:
    """``actors`` dealt over the nodes in proportion to their CPUs (largest first)."""
    share = [0] * len(node_cpus)
    for _ in range(actors):
        i = max(range(len(node_cpus)), key=lambda j: node_cpus[j] / (share[j] + 1))
        share[i] += 1
    return share
