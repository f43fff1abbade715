"""How big the actor pool is and what each actor reserves, from the cluster's resources.

CPU and GPU counts come from ``ray.cluster_resources()``.
On CPU, the pool leaves one CPU to the read and tokenize tasks; a pool that reserves
every CPU starves them and the job hangs (seen on 2 cores with 2 actors of 1 CPU). Each
actor still runs ``threads`` torch threads: the cores it shares with the readers are
idle whenever the readers are ahead, which is most of the time.
"""

from __future__ import annotations

from dataclasses import dataclass

from actors.errors import UserError

CPU_THREADS_PER_ACTOR = 4  # torch scales well to about 4 threads on small models
IO_CPUS = 1.0  # kept free for read and tokenize tasks


@dataclass(frozen=True)
class PoolPlan:
    min_actors: int
    max_actors: int
    num_cpus: float  # reserved per actor
    num_gpus: float  # reserved per actor
    threads: int  # torch intra-op threads per actor


def plan_pool(resources: dict[str, float], actors: tuple[int, int] | None) -> PoolPlan:
    """Size the pool for a cluster with ``resources`` (as ``ray.cluster_resources()``).

    Raises:
        UserError: naming ``--actors`` when the asked pool cannot fit.
    """
    cpus = float(resources.get("CPU", 0))
    gpus = int(resources.get("GPU", 0))
    if cpus < 2:
        raise UserError(
            "cluster", f"needs at least 2 CPUs (one for reading), has {cpus:g}"
        )
    if gpus:
        lo, hi = actors or (1, gpus)
        if hi > gpus:
            raise UserError(
                "--actors", f"{hi} actors of one GPU each; the cluster has {gpus} GPUs"
            )
        return PoolPlan(lo, hi, num_cpus=1.0, num_gpus=1.0, threads=1)
    usable = cpus - IO_CPUS
    if actors is None:
        hi = max(1, int(cpus) // CPU_THREADS_PER_ACTOR)
        actors = (hi, hi)
    lo, hi = actors
    if hi > usable / 0.25:
        raise UserError(
            "--actors",
            f"{hi} actors would leave no CPU for reading; "
            f"at most {int(usable / 0.25)} fit",
        )
    threads = max(1, int(cpus // hi))
    return PoolPlan(
        lo, hi, num_cpus=min(float(threads), usable / hi), num_gpus=0.0, threads=threads
    )
