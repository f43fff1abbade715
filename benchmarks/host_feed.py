"""Can the CPU side feed a GPU? lmbatch's host work per row, measured on one core.

On a GPU the model is fast enough that the CPU work around it decides the throughput:
the tokenize tasks (a CPU stage of their own, one core each) and each actor's host
work per call (padding by one gather, cutting micro-batches, building Arrow). Both
are measured here on the real all-MiniLM-L6-v2 tokenizer and the demo corpus, one
thread (``TOKENIZERS_PARALLELISM=false``: a Ray task holds one CPU):

- tokenize: ``tokenize_batch`` on blocks of 8,192 rows (a GPU actor's call) against
  what ``SentenceTransformer.encode`` does on the host for the same rows: sort by
  length, ``model.preprocess`` (pad to the longest, tensors) in batches of 256;
- an actor's host work per 8,192-row call, without the model, and the share of the
  padded tokens that are padding, at token budgets from 16k to 1M: the model's
  wasted work, which sets ``batching.THROUGHPUT_CEILING`` on CUDA.

Prints rows/s and tokens/s per core, the cores the tokenize stage needs for the
issue's targets (1M and 1.6M tokens/s), and appends the tables to RESULTS.md.

Usage: python benchmarks/host_feed.py [--rows 65536]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers is imported

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common import CORPUS, append_results, minilm  # isort: skip

from lmbatch.jobs.pool import ROWS_PER_CALL

CALL_ROWS = ROWS_PER_CALL["cuda"]  # rows a GPU actor gets per call
TARGETS = (
    1_000_000,
    1_600_000,
)  # tokens/s: the MiniLM goal, the published mark


def blocks(rows: int) -> list[pa.Table]:
    """The corpus cycled to ``rows``, as the reader hands it on: id, _text, _error."""
    from lmbatch.actors.text import check_text

    texts = pq.read_table(CORPUS)["text"].combine_chunks()
    cycled = pa.concat_arrays([texts] * (rows // len(texts) + 1))[:rows]
    out = []
    for start in range(0, rows, CALL_ROWS):
        chunk = cycled[start : start + CALL_ROWS]
        text, error = check_text(pa.chunked_array([chunk]))
        ids = pa.array([f"r{start + i}" for i in range(len(chunk))])
        out.append(pa.table({"id": ids, "_text": text, "_error": error}))
    return out


def lmbatch_tokenize(data: list[pa.Table]) -> tuple[float, list[pa.Table]]:
    from lmbatch.actors.tokenize import TokenizeConfig, tokenize_batch, with_backend

    # As a job's tasks get it: with the fast tokenizer's definition from the driver.
    config = with_backend(TokenizeConfig(model_path=minilm(), max_length=256))
    tokenize_batch(data[0], config)  # the tokenizer loads once per task process
    started = time.perf_counter()
    tokens = [tokenize_batch(block, config) for block in data]
    return time.perf_counter() - started, tokens


def st_tokenize(data: list[pa.Table]) -> float:
    """sentence-transformers' host side of ``encode``: its length sort, then
    ``tokenize`` per batch of 256 (padded tensors)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(minilm(), device="cpu")
    texts = [t for block in data for t in block["_text"].to_pylist()]
    model.preprocess(texts[:256])
    started = time.perf_counter()
    order = np.argsort([-len(t) for t in texts])  # encode sorts by length
    ordered = [texts[i] for i in order]
    for i in range(0, len(ordered), 256):
        model.preprocess(ordered[i : i + 256])
    return time.perf_counter() - started


def actor_host(tokens: list[pa.Table], budget: int) -> tuple[float, int, float]:
    """An actor's work per call apart from the model, at a token budget:
    (seconds, micro-batches, share of the padded tokens that are padding)."""
    from lmbatch.actors.batching import TokenBudget, run_batched
    from lmbatch.actors.outputs import Outputs
    from lmbatch.actors.padding import TokenRows

    schema = pa.schema([("embedding", pa.list_(pa.float32(), 384))])
    parts = padded = real = 0
    started = time.perf_counter()
    for batch in tokens:
        rows = TokenRows.from_arrow(batch["_ids"])
        todo = np.flatnonzero(batch["_error"].is_null().to_numpy())
        out = Outputs(schema, batch.num_rows)
        cut = run_batched(
            rows.lengths[todo],
            TokenBudget(budget, budget),
            lambda r, rows=rows, todo=todo: rows.pad(todo[r], 0),
            lambda r: None,
        )
        for part, (ids, mask) in cut:
            out.put(todo[part], {"embedding": np.zeros((len(ids), 384), np.float32)})
            parts, padded, real = parts + 1, padded + mask.size, real + mask.sum()
        names = ["id", "embedding", "error"]
        arrays = [batch["id"], *out.arrays(), batch["_error"]]
        pa.Table.from_arrays(arrays, names=names)
    return time.perf_counter() - started, parts, 1 - real / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=65536)
    args = parser.parse_args()
    data = blocks(args.rows)
    ours, tokens = lmbatch_tokenize(data)
    theirs = st_tokenize(data)
    count = sum(pc.sum(pc.list_value_length(t["_ids"])).as_py() for t in tokens)
    lines = [
        f"{args.rows:,} rows, {count / args.rows:.1f} tokens a row, one core",
        "",
        "| tokenize | rows/s | tokens/s | × sentence-transformers | "
        + " | ".join(f"cores for {t / 1e6:g}M tokens/s" for t in TARGETS)
        + " |",
        "|---|---|---|---|" + "---|" * len(TARGETS),
    ]
    for name, seconds in (("lmbatch", ours), ("sentence-transformers", theirs)):
        cores = " | ".join(f"{t * seconds / count:.1f}" for t in TARGETS)
        lines.append(
            f"| {name} | {args.rows / seconds:,.0f} | {count / seconds:,.0f} | "
            f"{theirs / seconds:.2f} | {cores} |"
        )
    lines += [
        "",
        "| budget, padded tokens | micro-batches a call | padding | "
        "host ms a call | host rows/s |",
        "|---|---|---|---|---|",
    ]
    for budget in (1 << 14, 1 << 15, 1 << 16, 1 << 18, 1 << 20):
        seconds, parts, padding = actor_host(tokens, budget)
        lines.append(
            f"| {budget:,} | {parts / len(tokens):.1f} | {padding:.0%} | "
            f"{1000 * seconds / len(tokens):.1f} | {args.rows / seconds:,.0f} |"
        )
    append_results("host_feed: all-MiniLM-L6-v2 tokenizer", lines)


if __name__ == "__main__":
    main()
