"""`lmbatch serve` on the real all-MiniLM-L6-v2: requests/s under concurrency with
Ray Serve's dynamic batching (@serve.batch) against ``--max-batch-size 1``.

Each setting is deployed in turn on one local Ray (2 CPUs), warmed up, then sent
--requests single-text POSTs from --concurrency client threads over loopback HTTP.
Same texts, same order, same replica threads; only the batch size differs.

Usage: python benchmarks/serve_batching.py [--requests 600] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import json
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq

from common import CORPUS, append_results, minilm  # isort: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, text: str) -> float:
    started = time.perf_counter()
    request = urllib.request.Request(
        url, data=json.dumps({"inputs": [text]}).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=300) as r:
        assert r.status == 200 and json.loads(r.read())["results"][0]["error"] is None
    return time.perf_counter() - started


def measure(batch: int, wait_ms: float, texts: list[str], concurrency: int) -> dict:
    from ray import serve

    from lmbatch.jobs.serve import deploy, prepare_serve
    from lmbatch.jobs.spec import ServeSpec

    spec = ServeSpec(
        model=minilm(),
        task="embed",
        port=free_port(),
        max_batch_size=batch,
        batch_wait_ms=wait_ms,
    )
    url = deploy(prepare_serve(spec), threads=2)
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda t: post(url, t), texts[: concurrency * 2]))  # warm-up
            before = json.loads(urllib.request.urlopen(url + "stats").read())
            started = time.perf_counter()
            latencies = list(pool.map(lambda t: post(url, t), texts))
            seconds = time.perf_counter() - started
        after = json.loads(urllib.request.urlopen(url + "stats").read())
    finally:
        serve.shutdown()
    calls = after["batches"] - before["batches"]
    return {
        "batch": batch,
        "rps": len(texts) / seconds,
        "p50": 1000 * float(np.percentile(latencies, 50)),
        "p95": 1000 * float(np.percentile(latencies, 95)),
        "mean_batch": (after["texts"] - before["texts"]) / max(1, calls),
    }


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    args = parser.parse_args()
    texts = pq.read_table(CORPUS)["text"].to_pylist()[-args.requests :]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        runs = [
            measure(b, args.batch_wait_ms, texts, args.concurrency)
            for b in args.batch_sizes
        ]
    finally:
        ray.shutdown()
    base = runs[0]["rps"]
    lines = [
        f"{args.requests} single-text requests, {args.concurrency} concurrent clients, "
        f"batch wait {args.batch_wait_ms:g} ms, one replica, 2 torch threads.",
        "",
        "| --max-batch-size | requests/s | × first | p50 ms | p95 ms | mean batch |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['batch']} | {r['rps']:.1f} | {r['rps'] / base:.2f} | "
            f"{r['p50']:.0f} | {r['p95']:.0f} | {r['mean_batch']:.1f} |"
        )
    append_results("serve_batching: all-MiniLM-L6-v2 embed over HTTP", lines)


if __name__ == "__main__":
    main()
