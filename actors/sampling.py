"""Sampled generation that a retry repeats.

``--temperature`` (with ``--top-k``, ``--top-p``, ``--seed``) samples each new token
instead of taking the likeliest. A row's draws depend on its id, the seed and the
step only, never on the rows it shares a batch with or on which actor runs it: a
batch retried after its actor died, a ``--resume`` and a run with other batch sizes
all write the same text (the draw in ``actors/draws.py``).

torch-free: the driver builds the ``Sampling`` the actors receive.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sampling:
    temperature: float  # > 0: logits are divided by it before the draw
    top_k: int | None = None  # only the k likeliest tokens are drawn from
    top_p: float = 1.0  # only the fewest likeliest tokens whose mass reaches p
    seed: int = 0

    def describe(self) -> str:
        k = "" if self.top_k is None else f", top-k {self.top_k}"
        p = "" if self.top_p == 1.0 else f", top-p {self.top_p}"
        return f"sampled at temperature {self.temperature}{k}{p}, seed {self.seed}"


def row_keys(ids: list[str]) -> np.ndarray:
    """Each row id's 64-bit key (BLAKE2b): what its draws are derived from."""
    return np.array(
        [
            int.from_bytes(
                hashlib.blake2b(i.encode(), digest_size=8).digest(),
                "little",
                signed=True,
            )
            for i in ids
        ],
        dtype=np.int64,
    )
