"""Bounded memory: the same streamed infer job at 20,000 and 200,000 rows.

A tiny 2-layer BERT (hidden 32) with all-MiniLM-L6-v2's tokenizer, so that the model
costs little and what grows, if anything, is the pipeline. ``lmbatch infer`` runs as
a user runs it (its own embedded Ray); every process of its tree is sampled every
0.2 s for resident memory: the driver, the actor(s) and the rest of Ray.

Target: peak at 200k <= 1.2x peak at 20k for every process kind; time linear.

Usage: python benchmarks/scale.py [--rows 20000 200000]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from common import CORPUS, append_results, launcher, minilm  # isort: skip

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def tiny_model(path: Path) -> str:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(path)
    for name in TOKENIZER_FILES:
        if (Path(minilm()) / name).exists():
            shutil.copy(Path(minilm()) / name, path / name)
    return str(path)


def make_input(rows: int, path: Path) -> None:
    """Corpus sentences cycled to ``rows``, written in row groups as a large file is."""
    texts = [t[:300] for t in pq.read_table(CORPUS)["text"].to_pylist()]
    table = pa.table(
        {
            "row": [f"r{i}" for i in range(rows)],
            "text": [texts[i % len(texts)] for i in range(rows)],
        }
    )
    pq.write_table(table, path, row_group_size=5000)


def kind(process: psutil.Process) -> str:
    title = " ".join(process.cmdline())
    if "PredictActor" in title or "MapWorker" in title:
        return "actor"
    if "lmbatch" in title and "infer" in title:
        return "driver"
    return "ray (other)"


def sample(root: psutil.Process, peaks: dict, done: threading.Event) -> None:
    """Largest RSS seen of any one process of each kind, and of all together."""
    while not done.is_set():
        total = 0
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                rss = p.memory_info().rss
                k = kind(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            peaks[k] = max(peaks.get(k, 0), rss)
            total += rss
        peaks["all processes"] = max(peaks.get("all processes", 0), total)
        time.sleep(0.2)


def run(model: str, inp: Path, out: Path) -> tuple[float, dict]:
    exe = launcher()
    cmd = [exe, "infer", "--model", model, "--input", str(inp), "--task", "embed",
           "--id-column", "row", "--output", str(out), "--overwrite"]  # fmt: skip
    peaks: dict[str, int] = {}
    done = threading.Event()
    started = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watcher = threading.Thread(
        target=sample, args=(psutil.Process(process.pid), peaks, done)
    )
    watcher.start()
    _, err = process.communicate()
    seconds = time.perf_counter() - started
    done.set()
    watcher.join()
    if process.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{err.decode()[-3000:]}")
    rows = pq.read_table(out, columns=["id"]).num_rows
    assert rows == int(inp.stem.split("-")[1]), "rows lost or duplicated"
    return seconds, peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs=2, default=[20_000, 200_000])
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tiny_model(tmp / "tiny-bert")
        for n in args.rows:
            inp = tmp / f"rows-{n}.parquet"
            make_input(n, inp)
            results[n] = run(model, inp, tmp / f"out-{n}")
    small, large = args.rows
    (t_small, p_small), (t_large, p_large) = results[small], results[large]
    lines = [
        f"Tiny BERT (2 layers, hidden 32), `lmbatch infer --task embed`, one process. "
        f"Time: {t_small:.1f} s for {small:,} rows, {t_large:.1f} s for {large:,} "
        f"({t_large / t_small:.2f}x for {large / small:.0f}x the rows; "
        f"{small / t_small:.0f} and {large / t_large:.0f} rows/s).",
        "",
        f"| process | peak RSS MiB at {small:,} | at {large:,} | ratio |",
        "|---|---|---|---|",
    ]
    for k in ("driver", "actor", "ray (other)", "all processes"):
        a, b = p_small.get(k, 0), p_large.get(k, 0)
        lines.append(
            f"| {k} | {a / 2**20:.0f} | {b / 2**20:.0f} | {b / max(a, 1):.2f} |"
        )
    append_results("scale: bounded memory", lines)


if __name__ == "__main__":
    main()
