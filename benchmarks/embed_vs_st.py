"""lmbatch infer --task embed against what a user would pick instead, side by side.

Each tool runs as its own process, timed whole: imports, model load, reading the
corpus, encoding and writing Parquet, on the same cores and the same rows.

- lmbatch:      ``lmbatch infer --task embed`` (embedded local Ray)
- st:           ``SentenceTransformer.encode(batch_size=32, normalize_embeddings=True)``
- transformers: a plain loop of 32 rows, mean pooling, L2 normalisation

Prints rows/s of each, the ratios to sentence-transformers and the mean cosine to it,
and appends the table with the command to benchmarks/RESULTS.md.

Usage: python benchmarks/embed_vs_st.py [--rows 20000]
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
    append_results,
    corpus_rows,
    launcher,
    minilm,
    side_by_side,
)

TOOLS = ("lmbatch", "st", "transformers")


def child_st(inp: str, out: str) -> None:
    from sentence_transformers import SentenceTransformer

    table = pq.read_table(inp)
    model = SentenceTransformer(minilm(), device="cpu")
    emb = model.encode(
        table["text"].to_pylist(), batch_size=32, normalize_embeddings=True
    )
    write(table["row"], emb, out)


def child_transformers(inp: str, out: str) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    table = pq.read_table(inp)
    texts = table["text"].to_pylist()
    tokenizer = AutoTokenizer.from_pretrained(minilm())
    model = AutoModel.from_pretrained(minilm()).eval()
    chunks = []
    with torch.inference_mode():
        for i in range(0, len(texts), 32):
            enc = tokenizer(
                texts[i : i + 32],
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            )
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            chunks.append(torch.nn.functional.normalize(pooled, dim=1).numpy())
    write(table["row"], np.concatenate(chunks), out)


def write(ids: pa.ChunkedArray, emb: np.ndarray, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    lists = pa.array(list(emb.astype(np.float32)), pa.list_(pa.float32()))
    pq.write_table(pa.table({"id": ids, "embedding": lists}), f"{out}/part-0.parquet")


def command(tool: str, out: Path, inp: Path) -> list[str]:
    if tool == "lmbatch":
        exe = launcher()
        return [
            exe,
            "infer",
            "--model",
            minilm(),
            "--input",
            str(inp),
            "--task",
            "embed",
            "--id-column",
            "row",
            "--output",
            str(out),
            "--overwrite",
        ]
    return [sys.executable, __file__, "--child", tool, str(inp), str(out)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument(
        "--child", nargs=3, metavar=("TOOL", "IN", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        tool, inp, out = args.child
        {"st": child_st, "transformers": child_transformers}[tool](inp, out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "input.parquet"
        corpus_rows(args.rows, inp)
        run = functools.partial(command, inp=inp)
        seconds, cosines = side_by_side(TOOLS, run, Path(tmp), "st")
    report(args.rows, seconds, {tool: float(c.mean()) for tool, c in cosines.items()})


def report(rows: int, seconds: dict[str, float], cosine: dict[str, float]) -> None:
    lines = [
        "| tool | seconds (whole process) | rows/s | × sentence-transformers "
        "| mean cosine to ST |",
        "|---|---|---|---|---|",
    ]
    for tool in TOOLS:
        rate = rows / seconds[tool]
        ratio = seconds["st"] / seconds[tool]
        lines.append(
            f"| {tool} | {seconds[tool]:.1f} | {rate:.1f} | {ratio:.2f} "
            f"| {cosine[tool]:.6f} |"
        )
    append_results(f"embed_vs_st: {rows} rows, all-MiniLM-L6-v2 fp32", lines)


if __name__ == "__main__":
    main()
