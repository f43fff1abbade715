"""One writer per output: the job writing an output holds a lease on it.

Two jobs on one output lose or duplicate rows: a second ``--resume`` recomputes and
writes again every row the first has not committed yet, and a second
``--overwrite`` deletes files the first has written and goes on writing. So a
running infer job keeps ``_writer.json`` in its output (its host, pid and a
heartbeat every 15 s) and removes it when it ends; another job refuses that output
before Ray starts while the writer lives. A writer is gone when its heartbeat is a
minute old (a lost machine), or at once when it ran on this host and its process
has ended (a driver killed with SIGKILL, then ``--resume``). An optimize job, whose
output appears only once its artifact is whole, holds its lease beside it
(``.OUT.writer.json``): two runs would share their step snapshots.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import psutil
import pyarrow.fs as pafs

from lmbatch.actors.storage import is_local
from lmbatch.errors import UserError

log = logging.getLogger("lmbatch")
WRITER_FILE = "_writer.json"  # leading '_': no reader takes it for data
HEARTBEAT_SECONDS = 15.0
LAPSE_SECONDS = 60.0  # a writer not seen for this long is gone


@dataclass(frozen=True)
class Writer:
    host: str
    pid: int
    seen: float  # wall clock of its last heartbeat

    @classmethod
    def this_process(cls) -> Writer:
        return cls(socket.gethostname(), os.getpid(), time.time())

    def gone(self, now: float) -> bool:
        if now - self.seen > LAPSE_SECONDS:
            return True
        return self.host == socket.gethostname() and not _alive(self.pid)


def check_no_writer(
    fs: pafs.FileSystem, path: str, output: str, name: str = WRITER_FILE
) -> None:
    """Raises: UserError naming ``--output`` while another job holds the lease
    ``name`` in the folder ``path``."""
    writer = read_writer(fs, path, name)
    now = time.time()
    if writer is None or writer.gone(now):
        return
    ago = max(0.0, now - writer.seen)  # another host's clock may run ahead
    raise UserError(
        "--output",
        f"another lmbatch job is writing {output} (pid {writer.pid} on "
        f"{writer.host}, seen {ago:.0f}s ago); wait for it or stop it (a job whose "
        f"machine was lost lapses {LAPSE_SECONDS:.0f}s after it was last seen)",
    )


@contextlib.contextmanager
def writer_lease(
    fs: pafs.FileSystem, path: str, name: str = WRITER_FILE
) -> Iterator[None]:
    """Hold the lease ``name`` in the folder ``path`` while the block runs, its
    heartbeat on a thread (the driver's own thread blocks in Ray's calls)."""
    file = f"{path}/{name}"
    _write(fs, file)
    stop = threading.Event()
    beat = threading.Thread(
        target=_heartbeat, args=(fs, file, stop), name="lmbatch-lease", daemon=True
    )
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(FileNotFoundError):
            fs.delete_file(file)


def read_writer(
    fs: pafs.FileSystem, path: str, name: str = WRITER_FILE
) -> Writer | None:
    """The lease ``name`` in ``path``; None where there is none, or what is there is
    unreadable (a writer cut short while writing it is gone)."""
    try:
        with fs.open_input_stream(f"{path}/{name}") as f:
            return Writer(**json.loads(f.read()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def _heartbeat(fs: pafs.FileSystem, file: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        try:
            _write(fs, file)
        except OSError as e:  # a storage hiccup; the next beat tries again
            log.warning("lmbatch: could not renew %s: %s", file, e)


def _write(fs: pafs.FileSystem, file: str) -> None:
    """The lease whole or not at all: a reader between a truncation and the write
    found no writer, and a second job took the output. On a local disk it is
    written aside and renamed over the old one (a rename replaces at once); an
    object store's put replaces the whole object already."""
    record = json.dumps(asdict(Writer.this_process())).encode()
    aside = f"{file}.{os.getpid()}.tmp" if is_local(fs) else file
    with fs.open_output_stream(aside) as f:
        f.write(record)
    if aside != file:
        fs.move(aside, file)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie, killed but not yet
    reaped by its parent, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's process
        return True
