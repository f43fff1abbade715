"""Progress a person can read: one line, live on a terminal, else one every 15 s.

    48,128 of 120,000 rows (40%)  1,204 rows/s  ETA 59s  errors 3

Rows done and errors are what the actors report to the job's stats sink; the total
comes from the inputs' footers where they give it (Parquet, Feather; CSV and JSONL
do not). While the pool is short of actors the line says so ("waiting for 2 of 2 GPU
actors; the autoscaler is starting nodes"), so a job waiting on the cluster is never
silent. Ray Data's own multi-line operator tables are replaced by this line unless
``--verbose``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data

from lmbatch.jobs.inputs import SEEKABLE, is_arrow_file

LOGGED_EVERY_S = 15.0  # where stderr is not a terminal: logs, CI, a submitted job
LIVE_EVERY_S = 1.0
FOOTER_READERS = 16  # footers read at once for the total; each is I/O, not CPU


@dataclass(frozen=True)
class Pool:
    """What the progress line compares the actors that reported with."""

    actors: int  # the pool's size (its minimum)
    gpus: int  # GPUs it spreads over; 0 on CPU


def footer_rows(fs: pafs.FileSystem, paths: list[str], fmt: str) -> int | None:
    """Rows of the input files from their footers (Parquet's, or an Arrow IPC file's:
    Feather), or None if any has none (JSONL, CSV, an Arrow stream as Hugging Face
    datasets write) or is not readable (the reader reports that file itself).
    Footers are read ``FOOTER_READERS`` at a time: on object storage each is a round
    trip or two, and a job of 10,000 files would otherwise wait minutes for its
    total."""
    if fmt not in SEEKABLE:
        return None
    with ThreadPoolExecutor(FOOTER_READERS, thread_name_prefix="lmbatch-footer") as ex:
        counts = list(ex.map(lambda path: _footer_rows(fs, path, fmt), paths))
    return None if None in counts else sum(counts)


def _footer_rows(fs: pafs.FileSystem, path: str, fmt: str) -> int | None:
    try:
        with fs.open_input_file(path) as f:
            if fmt == "parquet":
                return pq.ParquetFile(f).metadata.num_rows
            if not is_arrow_file(f):
                return None  # the stream layout has no footer to count from
            return pa.ipc.open_file(f).count_rows()
    except Exception:  # noqa: BLE001 - a count is a nicety; reading reports errors
        return None


def line(done: int, total: int | None, seconds: float, errors: int) -> str:
    rate = done / seconds if seconds > 0 else 0.0
    parts = [f"{done:,} rows"]
    if total:
        parts = [f"{done:,} of {total:,} rows ({100 * done / total:.0f}%)"]
    parts.append(f"{rate:,.0f} rows/s")
    if total and rate > 0 and done < total:
        parts.append(f"ETA {_duration((total - done) / rate)}")
    parts.append(f"errors {errors:,}")
    return "  ".join(parts)


def waiting(up: int, pool: Pool) -> str | None:
    """What the job waits for, while fewer actors than the pool's have started."""
    if up >= pool.actors:
        return None
    kind = "GPU actors" if pool.gpus else "actors"
    text = f"waiting for {pool.actors - up} of {pool.actors} {kind}"
    if pool.gpus and ray.cluster_resources().get("GPU", 0) < pool.gpus:
        text += "; the autoscaler is starting nodes"
    return text


@contextlib.contextmanager
def progress(
    sink,
    pool: Pool,
    total: Callable[[], int | None],
    restored: int = 0,
    out=sys.stderr,
) -> Iterator[None]:
    """Print the progress line while the block runs. The total is counted in a
    thread of its own, so that counting delays neither the job nor its first lines:
    until it is known, the line gives rows and rate alone."""
    live = out.isatty()
    stop = threading.Event()
    known: list[int | None] = [None]
    started = time.monotonic()

    def count() -> None:
        known[0] = total()

    def report() -> None:
        last = -LOGGED_EVERY_S  # the first line straight away: the job has started
        while not stop.wait(LIVE_EVERY_S):
            now = time.monotonic()
            if not live and now - last < LOGGED_EVERY_S:
                continue
            last = now
            text = _status(sink, pool, known[0], now - started, restored)
            print(f"\r{text:<100}" if live else text, end="" if live else "\n",
                  file=out, flush=True)  # fmt: skip

    threading.Thread(target=count, daemon=True, name="lmbatch-total").start()
    thread = threading.Thread(target=report, daemon=True, name="lmbatch-progress")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        if live:
            print(file=out, flush=True)


def _status(sink, pool: Pool, total: int | None, seconds: float, restored: int) -> str:
    try:
        actors = ray.get(sink.snapshot.remote(), timeout=10)
    except ray.exceptions.GetTimeoutError:
        return "waiting for the job's stats"
    done = restored + sum(a["rows"] for a in actors)
    errors = sum(a["errors"] for a in actors)
    text = line(done, total, seconds, errors)
    blocked = waiting(len({a["actor"] for a in actors}), pool)
    return f"{text}  ({blocked})" if blocked else text


# Ray Data's loggers that announce a failed task before the job's error is raised.
FAILURE_LOGGERS = (
    "ray.data.exceptions",
    "ray.data._internal.execution.streaming_executor_state",
)


def off_console(record: logging.LogRecord) -> bool:
    """Marks an error record with Ray Data's own ``hide``: its log file keeps it, the
    console does not. The job's error follows anyway, as one line for a user's
    mistake, with its traceback for a bug."""
    if record.levelno >= logging.ERROR:
        record.hide = True
    return True


# Ray Data's loggers of its own progress, and the level kept on the console: its
# note that the bars are off (a warning), the execution plan as a job starts, its
# time and rows written as it ends (the summary says all of it).
PROGRESS_LOGGERS = {
    "ray.data._internal.progress": logging.ERROR,
    "ray.data._internal.execution.streaming_executor": logging.WARNING,
    "ray.data.dataset": logging.WARNING,
    # Each resume: "Loading checkpoint from OUT/_checkpoint, this could take a
    # while", and the checkpoint's own dataset "registers for logging while another
    # dataset ... is also logging".
    "ray.data.checkpoint.checkpoint_filter": logging.WARNING,
    "ray.data._internal.logging": logging.WARNING,
}


@contextlib.contextmanager
def quiet_ray_data(verbose: bool) -> Iterator[None]:
    """Ray Data's own progress bars, tables and notes off for the job, and its notes
    on a failed task off the console, unless ``verbose``. Its log files keep them.
    So is its advice to raise ``override_num_blocks`` when the pool got fewer blocks
    than actors (no row left to compute, on a resumed finished job or an empty
    input): the job's blocks are sized already."""
    context = ray.data.DataContext.get_current()
    before = context.enable_progress_bars
    loggers = [logging.getLogger(name) for name in PROGRESS_LOGGERS]
    levels = [logger.level for logger in loggers]
    failures = [logging.getLogger(name) for name in FAILURE_LOGGERS]
    if not verbose:
        context.enable_progress_bars = False
        for logger, kept in zip(loggers, PROGRESS_LOGGERS.values(), strict=True):
            logger.setLevel(kept)
        for failure in failures:
            failure.addFilter(off_console)
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.filterwarnings(
                    "ignore", message="The minimum number of concurrent actors"
                )
            yield
    finally:
        context.enable_progress_bars = before
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        for failure in failures:
            failure.removeFilter(off_console)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
