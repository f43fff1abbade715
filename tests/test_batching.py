"""The adaptive batcher without Ray: a fake OOM above a token count, exact sequences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmbatch.actors.batching import TokenBudget, is_oom, next_batch, run_batched


def fake_model(limit: int, lengths: np.ndarray, tried: list[int]):
    """A step that raises torch.OutOfMemoryError when rows x longest > limit."""

    def step(rows: np.ndarray) -> list[int]:
        padded = len(rows) * int(lengths[rows].max())
        tried.append(padded)
        if padded > limit:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB"
            )
        return [int(r) for r in rows]

    return step


def test_next_batch_fills_the_budget_over_sorted_lengths():
    lengths = np.array([2, 2, 3, 3, 8, 8, 8, 9])
    assert next_batch(lengths, 0, 12) == 4  # 4 rows x 3 tokens
    assert next_batch(lengths, 4, 12) == 5  # a row is always taken, even over budget
    assert next_batch(lengths, 0, 1) == 1


def test_next_batch_takes_the_most_rows_that_fit():
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = np.sort(rng.integers(1, 300, size=int(rng.integers(1, 500))))
        start = int(rng.integers(0, len(lengths)))
        budget = int(rng.integers(1, 20_000))
        end = next_batch(lengths, start, budget)
        assert start < end <= len(lengths)
        assert end == start + 1 or (end - start) * lengths[end - 1] <= budget
        if end < len(lengths):  # one more row would not fit
            assert (end + 1 - start) * lengths[end] > budget


def test_oom_halves_retries_same_rows_and_loses_nothing():
    lengths = np.full(16, 10)
    tried: list[int] = []
    budget = TokenBudget(tokens=160, ceiling=160, grow_after=100)
    done = list(
        run_batched(lengths, budget, fake_model(45, lengths, tried), on_row_oom=None)
    )
    assert tried[:3] == [160, 80, 40]  # halved twice, then fits
    assert budget.history == [160, 80, 40]
    assert budget.ooms == 2
    rows = [r for idx, result in done for r in result]
    assert sorted(rows) == list(range(16))  # every row once, none twice


def test_budget_grows_back_after_clean_batches():
    lengths = np.full(64, 10)
    budget = TokenBudget(tokens=20, ceiling=80, grow_after=2)
    sizes = [
        len(rows)
        for rows, _ in run_batched(lengths, budget, lambda r: None, on_row_oom=None)
    ]
    assert sizes[:6] == [2, 2, 4, 4, 8, 8]
    assert budget.history == [20, 40, 80]


def test_fixed_budget_never_grows():
    lengths = np.full(20, 10)
    budget = TokenBudget(tokens=20, ceiling=80, grow_after=1, fixed=True)
    sizes = [
        len(rows)
        for rows, _ in run_batched(lengths, budget, lambda r: None, on_row_oom=None)
    ]
    assert set(sizes) == {2}


def test_a_row_too_big_alone_is_reported_not_fatal():
    lengths = np.array([5, 50, 5])
    tried: list[int] = []
    failed: list[int] = []
    budget = TokenBudget(tokens=64, ceiling=64, grow_after=100)
    done = list(
        run_batched(lengths, budget, fake_model(20, lengths, tried), failed.append)
    )
    assert failed == [1]
    assert sorted(r for _, result in done for r in result) == [0, 2]


def test_other_errors_are_not_swallowed():
    with pytest.raises(ValueError):
        list(
            run_batched(
                np.array([3]),
                TokenBudget(8, 8),
                lambda r: (_ for _ in ()).throw(ValueError()),
                on_row_oom=None,
            )
        )


@pytest.mark.parametrize(
    "exc, expected",
    [
        (torch.OutOfMemoryError("CUDA out of memory"), True),
        (MemoryError(), True),
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:121] "
                "DefaultCPUAllocator: can't allocate memory"
            ),
            True,
        ),
        (
            RuntimeError(
                "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"
            ),
            True,
        ),
        (RuntimeError("shape mismatch"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_is_oom(exc, expected):
    assert is_oom(exc) is expected
