"""Host <-> device copies of a micro-batch: the one place a value leaves the GPU.

Inputs go up from pinned host memory without blocking; results come back the same
way, into pinned memory, with an event to wait on. The actor waits for a batch's
results only after it has queued the next batch, so the GPU computes while the host
pads the next rows and builds Arrow from the last ones.
"""

from __future__ import annotations

import time

import numpy as np
import torch

# numpy has no bfloat16; halves come back as float32, which is what outputs hold.
HOST_FLOAT = {torch.bfloat16: torch.float32, torch.float16: torch.float32}


def to_device(arrays: tuple[np.ndarray, ...], device: torch.device) -> tuple:
    """numpy arrays as tensors on ``device``; on CUDA, copied asynchronously."""
    tensors = tuple(torch.from_numpy(a) for a in arrays)
    if device.type != "cuda":
        return tensors
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)


def start_clock(device: torch.device) -> torch.cuda.Event | float:
    """A mark to time a micro-batch's device work from (``HostCopy.seconds``)."""
    if device.type != "cuda":
        return time.perf_counter()
    mark = torch.cuda.Event(enable_timing=True)
    mark.record()
    return mark


class HostCopy:
    """A head's results on their way to host memory; ``wait`` returns them as numpy.

    ``seconds``, once waited for, is the device's time from ``started`` to the
    results being in host memory: on CUDA measured by events, not by the host.
    """

    def __init__(
        self, tensors: dict[str, torch.Tensor], started: torch.cuda.Event | float
    ) -> None:
        self._tensors = {
            name: t.detach()
            .to(HOST_FLOAT.get(t.dtype, t.dtype))
            .to("cpu", non_blocking=True)
            for name, t in tensors.items()
        }
        self._started = started
        self._done = None
        self.seconds = 0.0
        if isinstance(started, torch.cuda.Event):
            self._done = torch.cuda.Event(enable_timing=True)
            self._done.record()
        else:
            self.seconds = time.perf_counter() - started

    def wait(self) -> dict[str, np.ndarray]:
        if self._done is not None:
            self._done.synchronize()
            self.seconds = self._started.elapsed_time(self._done) / 1000
        return {name: t.numpy() for name, t in self._tensors.items()}
