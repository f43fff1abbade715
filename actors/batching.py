"""The adaptive batcher: the only place a micro-batch is sized.

Each actor cuts the rows it receives, sorted by length, into micro-batches whose padded
size (rows x longest row) fits a *token budget*, so short and long texts both fill the
model well. On out-of-memory it halves the budget and retries the same rows: nothing is
dropped or done twice. After ``grow_after`` clean batches it doubles back toward the
ceiling. A row that fails alone at the floor gets an ``out_of_memory`` error instead of
killing the job. The shape follows accelerate's ``find_executable_batch_size``.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from lmbatch.actors.memory import DeviceMemory, Probe

T = TypeVar("T")
log = logging.getLogger(__name__)

# Past memory, bigger micro-batches stop paying: on CPU, 2048 tokens ran fastest on
# MiniLM with 2 threads (cache-sized GEMMs, benchmarks/RESULTS.md). On a GPU, padding
# decides: the fewer micro-batches an 8,192-row call is cut into, the wider the span
# of lengths each pads to. On the demo corpus 32k, 64k, 256k and 1M padded tokens
# waste 12%, 20%, 43% and 68% of the model's work on padding
# (benchmarks/host_feed.py), while 32k tokens already keep a GPU busy (a MiniLM
# forward of 32k tokens is about 0.7 TFLOP; a 1B model's, 64).
THROUGHPUT_CEILING = {"cpu": 2048, "cuda": 1 << 15}
PROBE_ROWS, PROBE_LENGTH = 8, 128

OOM_MESSAGES = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "defaultcpuallocator",
    "cublas_status_alloc_failed",
    "cudnn_status_not_supported",
)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` means the batch did not fit in memory (CUDA or CPU)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, RuntimeError) and exc.args:
        message = str(exc.args[0]).lower()
        return any(m in message for m in OOM_MESSAGES)
    return False


@dataclass
class TokenBudget:
    """One actor's budget, in padded tokens per micro-batch."""

    tokens: int  # current budget
    ceiling: int  # never grow past this
    floor: int = 1  # a budget this small still runs one row
    grow_after: int = 8  # clean micro-batches before doubling
    fixed: bool = False  # --batch-tokens: the user's number, never grown
    history: list[int] = field(default_factory=list)  # every budget taken, in order
    ooms: int = 0
    _clean: int = 0

    def __post_init__(self) -> None:
        self.history.append(self.tokens)

    def shrink(self) -> None:
        """Halve, and lower the ceiling to 3/4 of what failed, so that regrowth stops
        short of it: repeated OOMs converge under the real limit instead of cycling."""
        self.ooms += 1
        self._clean = 0
        self.ceiling = max(self.floor, min(self.ceiling, self.tokens * 3 // 4))
        self._set(max(self.floor, self.tokens // 2))

    def succeeded(self) -> None:
        self._clean += 1
        if (
            not self.fixed
            and self._clean >= self.grow_after
            and self.tokens < self.ceiling
        ):
            self._clean = 0
            self._set(min(self.ceiling, self.tokens * 2))

    def _set(self, tokens: int) -> None:
        if tokens != self.tokens:
            self.tokens = tokens
            self.history.append(tokens)


def probe_budget(
    memory: DeviceMemory,
    run_probe: Callable[[int, int], None],
    device: str,
    bytes_per_token_floor: float,
    max_length: int,
) -> TokenBudget:
    """The first budget: what a probe batch says fits in this actor's memory.

    Runs one batch of up to ``PROBE_ROWS`` x ``PROBE_LENGTH`` tokens (halving the rows,
    then the length, if even that runs out of memory), measures its peak, and divides
    the memory still free, less a margin, by the bytes a token took. The result is
    also the ceiling that regrowth may not pass, together with the device's
    throughput ceiling.
    """
    rows, length = PROBE_ROWS, min(PROBE_LENGTH, max_length)
    ooms = 0
    while True:
        memory.start()
        try:
            run_probe(rows, length)
            break
        except Exception as exc:  # noqa: BLE001 - only OOM is handled
            if not is_oom(exc) or rows * length == 1:
                raise
            del exc
            ooms += 1
            _free_memory()
            rows, length = (rows // 2, length) if rows > 1 else (1, length // 2)
    fits = Probe(rows * length, memory.peak(), memory.free()).budget(
        bytes_per_token_floor
    )
    if rows * length < PROBE_ROWS * min(PROBE_LENGTH, max_length):
        fits = min(fits, rows * length)  # the probe itself did not fit: trust that
    tokens = max(1, min(fits, THROUGHPUT_CEILING.get(device, fits)))
    if fits < max_length:
        log.warning(
            "memory fits %d tokens a batch, less than a %d-token row", fits, max_length
        )
    return TokenBudget(tokens=tokens, ceiling=tokens, ooms=ooms)


def next_batch(lengths: np.ndarray, start: int, budget: int) -> int:
    """End index of the micro-batch from ``start`` over ascending ``lengths``.

    Rows are sorted ascending, so taking ``k`` rows pads them to
    ``k * lengths[start + k - 1]`` tokens, which never falls as ``k`` grows: one
    search finds the most rows that fit (no Python loop over rows; a GPU call holds
    thousands). At least one row is always taken.
    """
    window = lengths[start : start + max(1, budget)]  # every row holds >= 1 token
    padded = np.arange(1, len(window) + 1) * window
    return start + max(1, int(np.searchsorted(padded, budget, side="right")))


def run_batched(
    lengths: np.ndarray,
    budget: TokenBudget,
    step: Callable[[np.ndarray], T],
    on_row_oom: Callable[[int], None],
    over_limit: Callable[[], bool] = lambda: False,
) -> Iterator[tuple[np.ndarray, T]]:
    """Run ``step`` over every row, length-sorted, in budget-sized micro-batches.

    Args:
        lengths: token count of each row.
        budget: this actor's budget; shrunk on OOM and grown after clean runs.
        step: runs the model on the given row indices.
        on_row_oom: called with a row index that does not fit even alone.
        over_limit: whether the actor is now past its memory limit (CPU, where no
            allocator error comes before the kernel's OOM killer); the batch's results
            are kept, since they are correct, and the budget halves as for an OOM.
            A fixed budget (``--batch-tokens``) ignores it: the user chose that size.

    Yields:
        (row indices, step's result) for each micro-batch that ran.
    """
    order = np.argsort(lengths, kind="stable")
    sorted_lengths = lengths[order]
    start = 0
    while start < len(order):
        end = next_batch(sorted_lengths, start, budget.tokens)
        rows = order[start:end]
        try:
            result = step(rows)
        except Exception as exc:  # noqa: BLE001 - only OOM is handled; the rest re-raise
            if not is_oom(exc):
                raise
            del exc
            _free_memory()
            if end - start == 1 and budget.tokens <= max(
                budget.floor, sorted_lengths[start]
            ):
                on_row_oom(int(rows[0]))
                start = end
            else:
                budget.shrink()
            continue
        if not budget.fixed and over_limit():
            budget.shrink()
        else:
            budget.succeeded()
        yield rows, result
        start = end


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
