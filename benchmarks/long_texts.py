"""Long documents embedded whole: lmbatch --on-long chunk against what a user would
write instead with sentence-transformers, side by side.

The documents are the demo corpus's texts joined, in order, until each has about
``--words`` words: all-MiniLM-L6-v2 reads 256 tokens, so each needs several windows.
Each tool runs as its own process, timed whole (imports, model load, reading, encoding,
writing Parquet), on the same cores and documents.

- lmbatch:   ``lmbatch infer --task embed --on-long chunk``
- st:        the user's loop: the tokenizer's overflowing windows of 256 tokens, each
             decoded back to text, ``SentenceTransformer.encode(batch_size=32)`` on all
             windows, each document's vectors averaged by tokens and normalised
- truncated: ``lmbatch infer --task embed`` as before (each document's first 256
             tokens): how far the vector of a cut text is from the whole text's

Prints seconds and documents/s of each, the ratio to st, and the mean and lowest
cosine of each tool's vectors to st's; appends the table to RESULTS.md.

Usage: python benchmarks/long_texts.py [--docs 300] [--words 800]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common import (  # isort: skip
    CORPUS,
    append_results,
    launcher,
    minilm,
    side_by_side,
)

TOOLS = ("lmbatch", "st", "truncated")
WINDOW = 256  # all-MiniLM-L6-v2's max_seq_length


def documents(docs: int, words: int, path: Path) -> None:
    """``docs`` documents of the corpus's texts joined until ``words`` words each."""
    texts = [t for t in pq.read_table(CORPUS)["text"].to_pylist() if t]
    out, current, i = [], [], 0
    while len(out) < docs:
        current.append(texts[i % len(texts)])
        i += 1
        if sum(len(t.split()) for t in current) >= words:
            out.append("\n\n".join(current))
            current = []
    ids = [f"d{i:05d}" for i in range(docs)]
    pq.write_table(pa.table({"doc": ids, "text": out}), path)


def child_st(inp: str, out: str) -> None:
    """What a user writes: windows by the tokenizer, encode, average by tokens."""
    from sentence_transformers import SentenceTransformer

    table = pq.read_table(inp)
    model = SentenceTransformer(minilm(), device="cpu")
    windows = model.tokenizer(
        table["text"].to_pylist(),
        truncation=True,
        max_length=WINDOW,
        return_overflowing_tokens=True,
    )
    owner = np.array(windows["overflow_to_sample_mapping"])
    tokens = np.array([len(ids) for ids in windows["input_ids"]], dtype=np.float64)
    texts = model.tokenizer.batch_decode(windows["input_ids"], skip_special_tokens=True)
    vectors = model.encode(texts, batch_size=32)
    sums = np.zeros((table.num_rows, vectors.shape[1]))
    np.add.at(sums, owner, vectors * tokens[:, None])
    mean = sums / np.bincount(owner, weights=tokens)[:, None]
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    os.makedirs(out, exist_ok=True)
    lists = pa.array(list(mean.astype(np.float32)), pa.list_(pa.float32()))
    pq.write_table(pa.table({"id": table["doc"], "embedding": lists}), f"{out}/0.pq")


def command(tool: str, out: Path, inp: Path) -> list[str]:
    if tool == "st":
        return [sys.executable, __file__, "--child", str(inp), str(out)]
    chunk = ["--on-long", "chunk"] if tool == "lmbatch" else []
    return [
        launcher(), "infer", "--model", minilm(), "--input", str(inp), "--task",
        "embed", "--id-column", "doc", "--output", str(out), "--overwrite", *chunk,
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=300)
    parser.add_argument("--words", type=int, default=800)
    parser.add_argument(
        "--child", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        child_st(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "docs.parquet"
        documents(args.docs, args.words, inp)
        run = functools.partial(command, inp=inp)
        seconds, cosines = side_by_side(TOOLS, run, Path(tmp), "st")
    report(args, seconds, cosines)


def report(args, seconds: dict[str, float], cosines: dict[str, np.ndarray]) -> None:
    lines = [
        "| tool | seconds (whole process) | documents/s | × st (the user's loop) "
        "| mean cosine to st | lowest |",
        "|---|---|---|---|---|---|",
    ]
    for tool in TOOLS:
        lines.append(
            f"| {tool} | {seconds[tool]:.1f} | {args.docs / seconds[tool]:.1f} "
            f"| {seconds['st'] / seconds[tool]:.2f} | {cosines[tool].mean():.6f} "
            f"| {cosines[tool].min():.6f} |"
        )
    title = f"long_texts: {args.docs} documents of {args.words}+ words"
    append_results(f"{title}, all-MiniLM-L6-v2 fp32", lines)


if __name__ == "__main__":
    main()
