"""How long the progress line waits for its total on object storage.

The total of a Parquet input is the sum of its files' footer row counts. Each footer
is a round trip or two to the store, so a job of thousands of files read serially
waited seconds to minutes before its total (and, before this change, before its
first progress line). Side by side in one run, on files served by an S3-compatible
server (moto) on loopback: lmbatch's ``footer_rows`` (footers read 16 at a time),
the serial loop it replaced, and pyarrow's ``dataset(...).count_rows()``, what a user
would write. Loopback has no round trip to speak of, so each request passes through a
proxy that holds it ``--latency-ms`` first: AWS's guidance puts small S3 requests'
median latency "in the range of tens of milliseconds".

Usage: python benchmarks/input_total.py [--files 1000] [--latency-ms 30]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from common import MOTO_PORT, append_results, object_store

from lmbatch.jobs.progress import footer_rows

PROXY_PORT = MOTO_PORT + 1


@contextlib.contextmanager
def delayed(latency_s: float) -> Iterator[None]:
    """A TCP proxy on ``PROXY_PORT`` to moto that holds every chunk a client sends
    (a request) ``latency_s`` before passing it on."""
    loop = asyncio.new_event_loop()

    async def pump(reader, writer, delay: float) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1 << 16):
                await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        writer.close()

    async def connect(client_reader, client_writer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", MOTO_PORT)
        asyncio.ensure_future(pump(client_reader, writer, latency_s))
        asyncio.ensure_future(pump(reader, client_writer, 0.0))

    server = loop.run_until_complete(
        asyncio.start_server(connect, "127.0.0.1", PROXY_PORT)
    )
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def serial_rows(fs, paths: list[str]) -> int:
    """The loop ``footer_rows`` replaced: one footer after another."""
    total = 0
    for path in paths:
        with fs.open_input_file(path) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--latency-ms", type=float, default=30.0)
    args = parser.parse_args()
    table = pa.table({"text": ["a short text"] * 100})
    with object_store() as (direct, _), delayed(args.latency_ms / 1000):
        paths = [f"lmbatch/texts/part-{i:05d}.parquet" for i in range(args.files)]
        for path in paths:
            with direct.open_output_stream(path) as f:
                pq.write_table(table, f)
        fs = pafs.S3FileSystem(
            access_key="key", secret_key="secret", scheme="http",
            endpoint_override=f"127.0.0.1:{PROXY_PORT}",
        )  # fmt: skip
        counts = {
            "lmbatch footer_rows (16 at once)": lambda: footer_rows(
                fs, paths, "parquet"
            ),
            "serial loop (before)": lambda: serial_rows(fs, paths),
            "pyarrow dataset count_rows": lambda: pads.dataset(
                paths, filesystem=fs, format="parquet"
            ).count_rows(),
        }
        results = {}
        for name, count in counts.items():
            started = time.perf_counter()
            rows = count()
            results[name] = (time.perf_counter() - started, rows)
    lmbatch = results["lmbatch footer_rows (16 at once)"][0]
    lines = [
        "| total from footers | seconds | rows | × lmbatch |",
        "|---|---|---|---|",
        *(
            f"| {name} | {s:.2f} | {rows:,} | {s / lmbatch:.1f} |"
            for name, (s, rows) in results.items()
        ),
        "",
        f"{args.files:,} Parquet files of 100 rows on moto on loopback, each request"
        f" held {args.latency_ms:g} ms.",
    ]
    append_results(f"input_total: {args.files:,} Parquet footers", lines)


if __name__ == "__main__":
    main()
