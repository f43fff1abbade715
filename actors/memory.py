"""What one actor may spend on a micro-batch, on its own device.

The batcher sizes its first token budget from here: memory left for activations after
the weights, divided by the bytes one token costs, measured on a probe batch; less a
safety margin. ``CudaMemory`` reads the allocator; ``CpuMemory`` reads resident memory
against the actor's limit (Ray's ``memory`` resource, ``--actor-memory``), since on CPU
nothing stops a process that outgrows its share until the kernel kills it.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Protocol

import psutil
import torch

SAFETY_MARGIN = (
    0.25  # of the memory left, kept free for fragmentation and the unexpected
)


class DeviceMemory(Protocol):
    def free(self) -> int:
        """Bytes this actor may still allocate now."""

    def start(self) -> None:
        """Begin measuring a peak."""

    def peak(self) -> int:
        """Bytes above the level at ``start``, at the highest since then."""


class CudaMemory:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._base = 0

    def free(self) -> int:
        return int(torch.cuda.mem_get_info(self.device)[0])

    def start(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)
        self._base = torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return max(0, torch.cuda.max_memory_allocated(self.device) - self._base)


class CpuMemory:
    """Resident memory against a limit; the peak comes from the kernel's max RSS."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self._base = 0

    def free(self) -> int:
        return max(0, self.limit - rss())

    def start(self) -> None:
        self._base = max(rss(), max_rss())

    def peak(self) -> int:
        return max(0, max_rss() - self._base)


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def max_rss() -> int:
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
    """No --actor-memory: an equal share of what the node has free now."""
    return int(psutil.virtual_memory().available / max(1, actors_per_node))
