"""Where the bf16 ceiling is: all-MiniLM-L6-v2's forward pass alone, in-process, in
fp32, bf16, and bf16 under ``torch.compile(dynamic=True)``.

No Ray, no I/O: 1,024 corpus rows tokenized once (max 256 tokens), sorted by length,
batches of 32, one warm-up pass, then one timed pass each. The compile time is printed
apart and left out of rows/s. This bounds what any bf16 artifact can gain in a job.

Usage: python benchmarks/bf16_compile.py [--rows 1024]
"""

from __future__ import annotations

import argparse
import time

import pyarrow.parquet as pq
import torch

from common import CORPUS, append_results, minilm  # isort: skip


def batches(tokenizer, texts: list[str], size: int = 32) -> list[dict]:
    ordered = sorted(texts, key=lambda t: len(tokenizer(t)["input_ids"]))
    return [
        tokenizer(ordered[i : i + size], padding=True, truncation=True,
                  max_length=256, return_tensors="pt")
        for i in range(0, len(ordered), size)
    ]  # fmt: skip


@torch.inference_mode()
def rows_per_s(model, data: list[dict]) -> float:
    model(**data[0])  # warm-up (and, compiled, the compile)
    started = time.perf_counter()
    for batch in data:
        model(**batch)
    return sum(len(b["input_ids"]) for b in data) / (time.perf_counter() - started)


def main() -> None:
    from transformers import AutoModel, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(minilm())
    texts = pq.read_table(CORPUS)["text"].to_pylist()[: args.rows]
    data = batches(tokenizer, texts)
    fp32 = AutoModel.from_pretrained(minilm()).eval()
    bf16 = AutoModel.from_pretrained(minilm(), dtype=torch.bfloat16).eval()
    results = {"fp32": rows_per_s(fp32, data), "bf16": rows_per_s(bf16, data)}
    started = time.perf_counter()
    compiled = torch.compile(bf16, dynamic=True)
    with torch.inference_mode():
        for batch in data[:3]:
            compiled(**batch)
    compile_s = time.perf_counter() - started
    results["bf16 + torch.compile"] = rows_per_s(compiled, data)
    lines = [
        f"{len(texts)} corpus rows, batches of 32 sorted by length, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; compile and "
        f"first calls took {compile_s:.0f} s, not counted.",
        "",
        "| forward pass | rows/s | × fp32 |",
        "|---|---|---|",
    ]
    for name, speed in results.items():
        lines.append(f"| {name} | {speed:.1f} | {speed / results['fp32']:.2f} |")
    append_results("bf16_compile: all-MiniLM-L6-v2 forward pass, in-process", lines)


if __name__ == "__main__":
    main()
