"""Per-row random draws on the device, for sampled generation (``actors/sampling.py``).

A token is drawn by inverting the cumulative softmax of the (temperature-scaled,
top-k/top-p filtered) logits at one uniform number per row and step. That number is
SplitMix64 on the device: the row's stream, seeded by its id's key and ``--seed``, at
counter ``step``. So the draw needs no generator state, and a row draws the same
tokens in any batch, on any actor. Gumbel noise on every logit would draw the same
way, but needs a number per vocabulary entry: 5x the time of this draw on a CPU
(benchmarks/RESULTS.md, sampling_draw).
"""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lmbatch.actors.sampling import Sampling


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


GOLDEN = _signed(0x9E3779B97F4A7C15)  # SplitMix64's increment
MIX1, MIX2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shift(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer; int64 products wrap, as the uint64 ones it is
    written for."""
    x = (x ^ _shift(x, 30)) * MIX1
    x = (x ^ _shift(x, 27)) * MIX2
    return x ^ _shift(x, 31)


def uniform(keys: torch.Tensor, seed: int, counter: int, n: int = 1) -> torch.Tensor:
    """[rows, n] uniforms in (0, 1) with 53 bits: row ``keys``' streams from
    ``counter`` on."""
    rows = mix(keys + _signed(seed * GOLDEN % (1 << 64)))
    at = counter + torch.arange(n, device=keys.device)
    bits = _shift(mix(rows[:, None] + at[None, :] * GOLDEN), 11)
    return (bits.double() + 0.5) / float(1 << 53)


class RowDraw(LogitsProcessor):
    """Each row's token drawn from the softmax of its scores with its own uniform;
    every other token is made impossible, so greedy decoding keeps the draw."""

    def __init__(self, keys: torch.Tensor, seed: int, prompt_length: int) -> None:
        self.keys, self.seed, self.prompt_length = keys, seed, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_length
        # Filtered tokens add nothing. float32, as transformers' own sampling draws
        # from float32 probabilities; the uniform is scaled to the sum's total.
        cdf = scores.float().softmax(-1).cumsum(-1)
        at = (uniform(self.keys, self.seed, step) * cdf[:, -1:]).float()
        token = torch.searchsorted(cdf, at, right=True).clamp(max=scores.shape[-1] - 1)
        drawn = torch.full_like(scores, -torch.inf)
        return drawn.scatter_(1, token, 0.0)


def sampling_processors(
    sampling: Sampling, keys: torch.Tensor, prompt_length: int
) -> LogitsProcessorList:
    """transformers' own temperature, top-k and top-p warpers, then the row's draw."""
    processors = [TemperatureLogitsWarper(sampling.temperature)]
    if sampling.top_k is not None:
        processors.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        processors.append(TopPLogitsWarper(sampling.top_p))
    processors.append(RowDraw(keys, sampling.seed, prompt_length))
    return LogitsProcessorList(processors)
