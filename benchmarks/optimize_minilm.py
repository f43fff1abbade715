"""Optimize recipes on the real all-MiniLM-L6-v2, measured against fp32
``SentenceTransformer.encode`` side by side.

1. ``lmbatch optimize`` runs each recipe in ``examples/recipes`` (and the two plain
   precisions for reference) on the demo corpus's calibration part.
2. ``SentenceTransformer.encode(batch_size=32)`` in fp32 and ``lmbatch infer`` on each
   artifact embed the same rows: the held-out part of the corpus, cycled to --rows.
   Each is one whole process, timed (Ray start-up, load, read, write included).
3. Fidelity on the held-out rows against sentence-transformers' fp32 embeddings: mean
   and minimum cosine, top-10 neighbour overlap; bytes of the weight files.

Target: an artifact at >= 2.5x the rows/s of fp32 sentence-transformers with mean
cosine >= 0.99 and top-10 overlap >= 0.9.

Usage: python benchmarks/optimize_minilm.py [--rows 10000] [--recipes a.yaml ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from common import (  # isort: skip
    CORPUS,
    ROOT,
    append_results,
    embeddings,
    launcher,
    minilm,
)
from embed_vs_st import command  # isort: skip

RECIPES = sorted((ROOT / "examples" / "recipes").glob("minilm-*.yaml"))
PLAIN = {"fp32 (as is)": "fp32", "bf16 (as is)": "bf16", "cpu-int8 (as is)": "cpu-int8"}
HELD_OUT = 800  # corpus rows never seen by calibration or distillation


def split_corpus(tmp: Path, rows: int) -> tuple[Path, Path, list[str]]:
    """calibration.parquet, input.parquet (held-out rows cycled), held-out ids."""
    texts = pq.read_table(CORPUS)["text"].to_pylist()
    order = np.random.default_rng(0).permutation(len(texts))
    calibration = [texts[i] for i in order[:-HELD_OUT]]
    held = [texts[i] for i in order[-HELD_OUT:]]
    pq.write_table(pa.table({"text": calibration}), tmp / "calibration.parquet")
    cycled = [held[i % len(held)] for i in range(rows)]
    ids = [f"r{i}" for i in range(rows)]
    pq.write_table(pa.table({"row": ids, "text": cycled}), tmp / "input.parquet")
    return tmp / "calibration.parquet", tmp / "input.parquet", ids[:HELD_OUT]


def run(cmd: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def optimize(recipe: Path, calibration: Path, out: Path) -> float:
    exe = launcher()
    return run(
        [
            exe,
            "optimize",
            "--model",
            minilm(),
            "--recipe",
            str(recipe),
            "--calibration",
            str(calibration),
            "--output",
            str(out),
            "--overwrite",
        ]
    )


def infer(model: str, precision: str, inp: Path, out: Path) -> float:
    cmd = command("lmbatch", inp, out)
    cmd[cmd.index("--model") + 1] = model
    return run([*cmd, "--precision", precision])


def fidelity(ref: dict, got: dict, ids: list[str]) -> tuple[float, float, float]:
    from lmbatch.optimize.evaluate import embedding_fidelity

    a = torch.tensor(np.stack([ref[i] for i in ids]))
    b = torch.tensor(np.stack([got[i] for i in ids]))
    m = embedding_fidelity(a, b)
    return m["cosine"], m["min_cosine"], m["top10"]


def weight_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--recipes", nargs="*", type=Path, default=RECIPES)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calibration, inp, ids = split_corpus(tmp, args.rows)
        models = {name: (minilm(), p) for name, p in PLAIN.items()}
        build = {}
        for recipe in args.recipes:
            out = tmp / recipe.stem
            build[recipe.stem] = optimize(recipe, calibration, out)
            models[recipe.stem] = (str(out), "fp32")
        st_seconds = run(command("st", inp, tmp / "st"))
        reference = embeddings(tmp / "st")
        rows = []
        for name, (model, precision) in models.items():
            seconds = infer(model, precision, inp, tmp / f"emb-{name}")
            got = embeddings(tmp / f"emb-{name}")
            assert got.keys() == reference.keys(), f"{name} lost or duplicated rows"
            rows.append(
                (name, seconds, weight_bytes(model), *fidelity(reference, got, ids))
            )
    report(args.rows, st_seconds, rows, build)


def report(n: int, st_seconds: float, rows: list, build: dict[str, float]) -> None:
    lines = [
        f"sentence-transformers fp32: {n / st_seconds:.1f} rows/s "
        f"({st_seconds:.1f} s, whole process).",
        "",
        "| model | rows/s (lmbatch infer) | × ST fp32 | MB weights | mean cosine "
        "| min cosine | top-10 overlap | optimize s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, seconds, size, cos, min_cos, top10 in rows:
        lines.append(
            f"| {name} | {n / seconds:.1f} | {st_seconds / seconds:.2f} | "
            f"{size / 1e6:.1f} | {cos:.5f} | {min_cos:.4f} | {top10:.3f} | "
            f"{build.get(name, 0):.0f} |"
        )
    append_results(f"optimize_minilm: {n} held-out rows, all-MiniLM-L6-v2", lines)


if __name__ == "__main__":
    main()
