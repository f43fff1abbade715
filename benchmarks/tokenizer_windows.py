"""Do a cut encoding's overflowing pieces keep every token, in this tokenizers?

--on-long chunk reads a long text as the pieces the tokenizers library cuts it into.
tokenizers 0.23.1 and 0.23.2 leave pieces out (huggingface/tokenizers#2091), which
lmbatch refuses. This counts, over the demo corpus and MiniLM's tokenizer, the rows
whose pieces (less each one's stride) are not the whole text, for several window sizes
and strides.

Usage: python benchmarks/tokenizer_windows.py [--rows 2000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow.parquet as pq
import tokenizers
from tokenizers import Tokenizer

from common import CORPUS, append_results, minilm  # isort: skip

CUTS = ((16, 0), (16, 4), (7, 3), (50, 10))  # (window, stride)


def uncovered(path: str, texts: list[str]) -> tuple[int, int]:
    """(cut rows whose pieces miss tokens, cut rows) over every window and stride,
    without special tokens, as ``actors/tokenize.py``'s ``split`` cuts."""
    whole = Tokenizer.from_file(path)
    whole.no_padding()
    whole.no_truncation()
    full = whole.encode_batch(texts, add_special_tokens=False)
    missed = cut_rows = 0
    for window, stride in CUTS:
        cut = Tokenizer.from_file(path)
        cut.no_padding()
        cut.enable_truncation(window, stride=stride)
        pieces = cut.encode_batch(texts, add_special_tokens=False)
        for want, got in zip(full, pieces, strict=True):
            if len(want.ids) <= window:
                continue
            ids = list(got.ids)
            for piece in got.overflowing:
                ids += piece.ids[stride:]
            cut_rows += 1
            missed += ids != want.ids
    return missed, cut_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    texts = pq.read_table(CORPUS)["text"].to_pylist()[: args.rows]
    missed, checked = uncovered(str(Path(minilm()) / "tokenizer.json"), texts)
    line = f"| {tokenizers.__version__} | {missed:,} of {checked:,} |"
    print(line)
    append_results(
        "tokenizer_windows: do a cut text's pieces keep every token?",
        ["| tokenizers | cut rows whose pieces miss tokens |", "|---|---|", line],
    )


if __name__ == "__main__":
    main()
