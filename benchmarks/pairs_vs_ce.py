"""lmbatch infer --pair-column against sentence-transformers' CrossEncoder.

A cross-encoder scores (query, passage) pairs: a reranker's bulk job. No reranker's
weights can be had here, so the model is all-MiniLM-L6-v2's encoder with a one-output
classification head drawn with a fixed seed; both tools load that same directory.
Queries are the first 8 words of a corpus text, passages whole corpus texts, both
drawn with a fixed seed. Each tool runs as its own process, timed whole: imports,
model load, reading the pairs, scoring and writing Parquet, on the same cores.

- lmbatch: ``lmbatch infer --task classify --text-column query --pair-column passage``
- ce:      ``CrossEncoder.predict(pairs, batch_size=32)``

Prints pairs/s of each, the ratio to CrossEncoder and the largest difference in score,
and appends the table with the command to benchmarks/RESULTS.md.

Usage: python benchmarks/pairs_vs_ce.py [--rows 5000]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common import CORPUS, append_results, launcher, minilm  # isort: skip

TOOLS = ("lmbatch", "ce")


def make_cross_encoder(path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm(), num_labels=1)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm()).save_pretrained(path)


def make_pairs(rows: int, path: Path) -> None:
    texts = pq.read_table(CORPUS)["text"].to_pylist()
    rng = random.Random(0)
    queries = [" ".join(rng.choice(texts).split()[:8]) for _ in range(rows)]
    passages = [rng.choice(texts) for _ in range(rows)]
    ids = [f"r{i}" for i in range(rows)]
    table = pa.table({"row": ids, "query": queries, "passage": passages})
    pq.write_table(table, path)


def child_ce(model: str, inp: str, out: str) -> None:
    from sentence_transformers import CrossEncoder

    table = pq.read_table(inp)
    pairs = list(
        zip(table["query"].to_pylist(), table["passage"].to_pylist(), strict=True)
    )
    scores = CrossEncoder(model, device="cpu").predict(pairs, batch_size=32)
    os.makedirs(out, exist_ok=True)
    result = pa.table({"id": table["row"], "score": pa.array(scores, pa.float32())})
    pq.write_table(result, f"{out}/part-0.parquet")


def command(tool: str, model: Path, inp: Path, out: Path) -> list[str]:
    if tool == "lmbatch":
        return [launcher(), "infer", "--model", str(model), "--input", str(inp),
                "--task", "classify", "--text-column", "query",
                "--pair-column", "passage", "--id-column", "row",
                "--output", str(out), "--overwrite"]  # fmt: skip
    child = [str(model), str(inp), str(out)]
    return [sys.executable, __file__, "--child", *child]


def timed(tool: str, model: Path, inp: Path, out: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        command(tool, model, inp, out),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return time.perf_counter() - started


def scores(out: Path) -> tuple[list[str], np.ndarray]:
    table = pq.read_table(out, columns=["id", "score"]).sort_by("id")
    return table["id"].to_pylist(), table["score"].to_numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_ce(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model, inp = Path(tmp) / "cross-encoder", Path(tmp) / "pairs.parquet"
        make_cross_encoder(model)
        make_pairs(args.rows, inp)
        seconds = {t: timed(t, model, inp, Path(tmp) / t) for t in TOOLS}
        ids, want = scores(Path(tmp) / "ce")
        got_ids, got = scores(Path(tmp) / "lmbatch")
        assert got_ids == ids, "lmbatch lost or duplicated rows"
        difference = float(np.abs(got - want).max())
    lines = [
        "| tool | seconds (whole process) | pairs/s | × CrossEncoder "
        "| largest score difference |",
        "|---|---|---|---|---|",
    ]
    for tool in TOOLS:
        ratio = seconds["ce"] / seconds[tool]
        lines.append(
            f"| {tool} | {seconds[tool]:.1f} | {args.rows / seconds[tool]:.1f} "
            f"| {ratio:.2f} | {0.0 if tool == 'ce' else difference:.1e} |"
        )
    append_results(
        f"pairs_vs_ce: {args.rows} (query, passage) pairs, all-MiniLM-L6-v2 "
        "with a one-output head, fp32",
        lines,
    )


if __name__ == "__main__":
    main()
