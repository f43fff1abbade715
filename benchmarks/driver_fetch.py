"""What the driver fetches of a model on object storage before a job starts.

On a cluster the driver runs on the head, which holds no actor. It used to download
the whole model (``fetch_model(uri)``) to read its configs; it now fetches a
weights-free copy (configs, tokenizer, each safetensors header read by range) and
sizes the pool from that. Side by side in one run, each with a cold cache: the old
path (the whole download, then the footprint) and the new one (``prepare_infer``,
then the footprint), on a model served by an S3-compatible server (moto) on
loopback. A real object store is faster than moto per byte; the bytes are the same.

Usage: python benchmarks/driver_fetch.py [--model DIR] (default: a random-weight
BERT-base built here, 419 MiB).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
from common import CORPUS, append_results, minilm, object_store

from lmbatch.actors.footprint import model_bytes
from lmbatch.actors.model_files import fetch_model
from lmbatch.jobs.spec import InferSpec, prepare_infer


def bert_base(tmp: Path) -> Path:
    """BERT-base's architecture with random weights and MiniLM's tokenizer."""
    from transformers import BertConfig, BertModel

    path = tmp / "bertbase"
    BertModel(BertConfig()).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(Path(minilm()) / name, path / name)
    return path


def timed(check, tmp: Path) -> tuple[float, float, int]:
    """(seconds, MiB in the cache, fp16 footprint) of ``check`` on a cold cache."""
    cache = Path(tempfile.mkdtemp(dir=tmp))
    os.environ["LMBATCH_CACHE"] = str(cache)
    started = time.perf_counter()
    footprint = model_bytes(check(), "fp16")
    seconds = time.perf_counter() - started
    held = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    shutil.rmtree(cache)
    return seconds, held / 2**20, footprint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or bert_base(tmp)
        size = sum(p.stat().st_size for p in model.rglob("*") if p.is_file()) / 2**20
        with object_store() as (fs, uri_of):
            pafs.copy_files(str(model), "lmbatch/model", destination_filesystem=fs)
            uri = uri_of("lmbatch/model")
            spec = InferSpec.from_flags(
                model=uri, inputs=(str(CORPUS),), task="embed",
                output=str(tmp / "out"),
            )  # fmt: skip
            runs = {
                "whole model (before)": lambda: fetch_model(uri),
                "weights-free (now)": lambda: prepare_infer(spec).model_dir,
            }
            results = {name: timed(check, tmp) for name, check in runs.items()}
    whole = results["whole model (before)"][0]
    lines = [
        "| driver fetch | seconds | MiB fetched | fp16 footprint MiB | × whole model |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {s:.2f} | {mib:.1f} | {fp / 2**20:.0f} | {whole / s:.1f} |"
            for name, (s, mib, fp) in results.items()
        ),
        "",
        f"The model: {size:.0f} MiB on an S3-compatible server (moto) on loopback.",
    ]
    append_results("driver_fetch: a model on object storage, cold cache", lines)


if __name__ == "__main__":
    main()
