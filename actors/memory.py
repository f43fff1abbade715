"""What one actor may spend on a micro-batch, on its own device.

The batcher sizes its first token budget from here: memory left for activations after
the weights, divided by the bytes one token costs, measured on a probe batch; less a
safety margin. ``CudaMemory`` reads the allocator; ``CpuMemory`` reads resident memory
against the actor's limit (Ray's ``memory`` resource, ``--actor-memory``), since on CPU
nothing stops a process that outgrows its share until the kernel kills it.
"""

from __future__ import annotations

import ctypes
import functools
import resource
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import psutil
import torch

from lmbatch.actors.footprint import GPU_USABLE

CLEAR_REFS = "/proc/self/clear_refs"
SAMPLE_EVERY_S = 0.002  # where the kernel's peak cannot be reset
SAFETY_MARGIN = 0.25  # of the memory left, kept free for fragmentation and surprises
TRIM_ABOVE = 0.75  # of a CPU actor's limit: freed heap pages go back before a batch


class DeviceMemory(Protocol):
    method: str  # how a batch's peak is measured, for the summary

    def free(self) -> int:
        """Bytes this actor may still allocate now."""

    def start(self) -> None:
        """Begin measuring a peak (before a probe or a micro-batch)."""

    def peak(self) -> int:
        """Bytes above the level at ``start``, at the highest since then."""

    def held(self) -> int:
        """Bytes held at ``start``, before the batch: what no smaller batch frees."""

    def high_water(self) -> int:
        """The highest absolute usage since ``start``."""

    def over_limit(self) -> bool:
        """Whether usage since ``start`` passed this actor's limit."""

    def capacity(self) -> int:
        """The bytes this actor's batches are sized to fit in."""


class CudaMemory:
    """The CUDA caching allocator's counters, within this actor's share of its GPU.

    Actors that share a GPU each hold a fraction of it (Ray's ``num_gpus``); each
    sizes its batches to what its own share leaves after what this process holds,
    and never to more than the device has free. An overrun still raises
    OutOfMemoryError, which the batcher handles.
    """

    method = "CUDA allocator"

    def __init__(self, device: torch.device, share: float = 1.0) -> None:
        self.device = device
        self.limit = share_limit(torch.cuda.mem_get_info(device)[1], share)
        self._base = 0

    def free(self) -> int:
        device_free = int(torch.cuda.mem_get_info(self.device)[0])
        held = int(torch.cuda.memory_allocated(self.device))
        cached = int(torch.cuda.memory_reserved(self.device)) - held
        return cuda_free(device_free, cached, held, self.limit)

    def start(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)
        self._base = torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return max(0, self.high_water() - self._base)

    def held(self) -> int:
        return self._base

    def high_water(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))

    def over_limit(self) -> bool:
        return False

    def capacity(self) -> int:
        return self.limit


def share_limit(total_bytes: int, share: float) -> int:
    """Bytes an actor holding ``share`` of a GPU of ``total_bytes`` may allocate: its
    share of the usable part (each process's CUDA context lives outside it)."""
    return int(total_bytes * GPU_USABLE * min(1.0, max(share, 0.0)))


def cuda_free(device_free: int, cached: int, held: int, limit: int) -> int:
    """What this actor may still allocate: its limit less what it holds, and no more
    than the device has free plus what this process's allocator caches for reuse."""
    return max(0, min(device_free + cached, limit - held))


class CpuMemory:
    """Resident memory against a limit.

    A batch's peak is measured one of two ways, named in ``method`` (and in the job
    summary): the kernel's high-water mark (``VmHWM``), reset at each ``start``
    through ``/proc/self/clear_refs``, which sees every spike; or, where the peak
    cannot be reset (not Linux, or a container that forbids the write), the resident
    set sampled by a thread while the batch runs. Sampling can miss a short spike,
    which the budget's safety margin covers; a peak that cannot be reset would stay
    at the process's lifetime maximum, make every batch look over the limit and
    collapse the budget, so it is never used.
    """

    def __init__(self, limit_bytes: int, clear_refs: str = CLEAR_REFS) -> None:
        self.limit = limit_bytes
        self._clear_refs = clear_refs
        self._base = 0
        self._sampler: RssSampler | None = None
        if not reset_high_water(clear_refs):
            self._sampler = RssSampler()
        self.method = "kernel peak" if self._sampler is None else "sampled RSS"

    def free(self) -> int:
        return max(0, self.limit - rss())

    def start(self) -> None:
        # Near the limit, the heap's freed pages (resident until handed back) would
        # make the batch look over it: the budget halved to a row a batch, and stayed.
        if rss() > self.limit * TRIM_ABOVE:
            release_freed()
        if self._sampler is None:
            reset_high_water(self._clear_refs)
        else:
            self._sampler.reset()
        self._base = rss()

    def peak(self) -> int:
        return max(0, self.high_water() - self._base)

    def held(self) -> int:
        return self._base

    def high_water(self) -> int:
        measured = self._sampler.peak if self._sampler else high_water_rss()
        return max(measured, rss())

    def over_limit(self) -> bool:
        return self.high_water() > self.limit

    def capacity(self) -> int:
        return self.limit


class RssSampler:
    """The highest resident set seen since ``reset``, sampled every ``every_s`` by
    a daemon thread (it reads /proc while the batch's kernels release the GIL)."""

    def __init__(self, every_s: float = SAMPLE_EVERY_S) -> None:
        self.peak = rss()
        self._every = every_s
        threading.Thread(target=self._run, daemon=True, name="rss-sampler").start()

    def reset(self) -> None:
        self.peak = rss()

    def _run(self) -> None:
        while True:
            time.sleep(self._every)
            self.peak = max(self.peak, rss())


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def release_freed() -> None:
    """Hand the C heap's free pages back to the kernel. glibc keeps memory that
    torch freed resident (counted in the RSS a CPU actor measures) until asked:
    ~10 ms, so only near the limit. A no-op without glibc's malloc_trim (macOS)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # this process's C library
    except (OSError, AttributeError):
        return None


def reset_high_water(clear_refs: str = CLEAR_REFS) -> bool:
    """Reset the kernel's peak RSS to the current RSS; whether that worked."""
    try:
        with open(clear_refs, "w") as f:
            f.write("5")  # Linux >= 4.0
        return True
    except OSError:
        return False


def high_water_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@dataclass(frozen=True)
class Probe:
    """One measured probe batch."""

    tokens: int
    peak_bytes: int
    free_bytes: int

    def budget(
        self, floor_bytes_per_token: float, margin: float = SAFETY_MARGIN
    ) -> int:
        """Tokens a micro-batch may hold: usable memory / bytes per token.

        ``floor_bytes_per_token`` guards against a probe that measured ~0 because the
        allocator reused memory it already held (common on CPU).
        """
        per_token = max(self.peak_bytes / max(1, self.tokens), floor_bytes_per_token)
        return int(self.free_bytes * (1 - margin) / per_token)


def activation_floor(hidden_size: int, dtype_bytes: int) -> float:
    """A lower bound on activation bytes per token: the FFN's 4x-wide intermediate and
    a few hidden-size tensors, live at once in one layer (inference frees the rest)."""
    return float(hidden_size * dtype_bytes * 8)


def default_cpu_limit(actors_per_node: int) -> int:
    """No --actor-memory: an equal share of the node's memory, taken once the model
    is loaded (``Predictor``), so what this process holds is counted as its own."""
    free = psutil.virtual_memory().available
    return cpu_share(free, anonymous_rss(), _ray_node_memory(), actors_per_node)


def cpu_share(free: int, held: int, node_memory: float | None, actors: int) -> int:
    """An actor's equal share of what the node had for its actors, measured once
    this one holds its model. What the actors hold is part of their shares: counted
    as not free only, each actor's model counted against it twice, and actors that
    fit the node together were refused. Each of the node's actors holds about
    what this one does (the same model), so the node had ``free + actors * held``
    once all have loaded; Ray's memory for the node (measured as Ray started, or
    ``ray start --memory``) caps it, so that actors still loading are not counted
    as free. Without Ray, only this process's own memory is added back."""
    room = free + held * (actors if node_memory else 1)
    return int(min(room, node_memory or room) / max(1, actors))


def anonymous_rss() -> int:
    """This process's own resident memory: the shared libraries' and files' pages
    it maps are counted as free (reclaimable) by the kernel already."""
    info = psutil.Process().memory_info()
    return int(info.rss - getattr(info, "shared", 0))


def _ray_node_memory() -> float | None:
    import ray

    if not ray.is_initialized():
        return None
    here = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == here:
            return node["Resources"].get("memory")
    return None
