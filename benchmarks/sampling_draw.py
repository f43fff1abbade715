"""What a sampled token costs to draw: lmbatch's per-row draw against transformers'.

``model.generate(do_sample=True)`` draws each new token with ``torch.multinomial`` on
the softmax of the (warped) logits. lmbatch draws it by inverting the row's
cumulative softmax at one uniform number from the row's own stream
(``actors/draws.RowDraw``), so that a row draws the same text in any batch. Both
are timed here on the logits of one decoding step (random, the shapes of 64 rows of
a 32,000- and a 128,256-token vocabulary: Llama 2's and Llama 3's), one CPU thread,
with a plain softmax for scale. The model's own step, which both pay, is left out.

Usage: python benchmarks/sampling_draw.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import append_results

from lmbatch.actors.draws import RowDraw

SHAPES = ((64, 32000), (64, 128256))


def seconds(step, repeats: int) -> float:
    step()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lines = [
        "| rows x vocabulary | softmax ms | transformers (multinomial) ms "
        "| lmbatch (row draw) ms | × transformers |",
        "|---|---|---|---|---|",
    ]
    for rows, vocab in SHAPES:
        scores = torch.randn(rows, vocab)
        keys = torch.arange(rows, dtype=torch.long)
        ids = torch.zeros(rows, 8, dtype=torch.long)
        draw = RowDraw(keys, 0, 0)
        soft = seconds(lambda s=scores: s.softmax(-1), args.repeats)
        theirs = seconds(
            lambda s=scores: torch.multinomial(s.softmax(-1), 1), args.repeats
        )
        ours = seconds(lambda s=scores, d=draw, i=ids: d(i, s).argmax(-1), args.repeats)
        lines.append(
            f"| {rows} x {vocab:,} | {soft * 1e3:.1f} | {theirs * 1e3:.1f} "
            f"| {ours * 1e3:.1f} | {theirs / ours:.2f} |"
        )
    append_results("sampling_draw: one decoding step's draw, 1 CPU thread", lines)


if __name__ == "__main__":
    main()
