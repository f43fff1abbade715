"""One writer per output (``jobs/lease.py``): a second job refuses an output that a
live job writes, and takes one whose writer is gone. No Ray here; the killed
driver's lease, then ``--resume``, is in test_resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest
from click.testing import CliRunner

from lmbatch.errors import UserError
from lmbatch.jobs import lease
from lmbatch.jobs.cli import cli
from lmbatch.jobs.lease import WRITER_FILE, check_no_writer, read_writer, writer_lease

FS = pafs.LocalFileSystem()


def held_by(out, host: str, pid: int, age: float, name: str = WRITER_FILE) -> None:
    out.mkdir(exist_ok=True)
    record = {"host": host, "pid": pid, "seen": time.time() - age}
    (out / name).write_text(json.dumps(record))


def ended_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_live_writer_is_refused(tmp_path):
    held_by(tmp_path, socket.gethostname(), os.getpid(), age=3)
    with pytest.raises(UserError) as e:
        check_no_writer(FS, str(tmp_path), "out/")
    assert str(e.value).startswith(
        f"--output: another lmbatch job is writing out/ (pid {os.getpid()} on "
        f"{socket.gethostname()}, seen 3s ago); wait for it or stop it"
    )


def test_a_writer_on_another_host_counts_until_its_heartbeat_lapses(tmp_path):
    held_by(tmp_path, "gpu-node-7", 12345, age=20)
    with pytest.raises(UserError, match="pid 12345 on gpu-node-7"):
        check_no_writer(FS, str(tmp_path), "out/")
    held_by(tmp_path, "gpu-node-7", 12345, age=lease.LAPSE_SECONDS + 1)
    check_no_writer(FS, str(tmp_path), "out/")


def test_a_writer_whose_process_ended_here_is_gone_at_once(tmp_path):
    held_by(tmp_path, socket.gethostname(), ended_pid(), age=1)
    check_no_writer(FS, str(tmp_path), "out/")


def test_a_killed_but_unreaped_writer_is_gone(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while lease._alive(child.pid):  # a zombie until waited for
        assert time.monotonic() < deadline
        time.sleep(0.05)
    held_by(tmp_path, socket.gethostname(), child.pid, age=1)
    check_no_writer(FS, str(tmp_path), "out/")
    child.wait()


def test_no_lease_or_an_unreadable_one_is_no_writer(tmp_path):
    check_no_writer(FS, str(tmp_path / "missing"), "out/")
    (tmp_path / WRITER_FILE).write_text('{"host": "h", "pid"')  # cut short
    check_no_writer(FS, str(tmp_path), "out/")


def test_the_lease_is_held_renewed_and_given_back(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "HEARTBEAT_SECONDS", 0.05)
    with writer_lease(FS, str(tmp_path)):
        first = read_writer(FS, str(tmp_path))
        assert (first.host, first.pid) == (socket.gethostname(), os.getpid())
        with pytest.raises(UserError, match="another lmbatch job is writing"):
            check_no_writer(FS, str(tmp_path), "out/")
        deadline = time.monotonic() + 10
        while read_writer(FS, str(tmp_path)).seen == first.seen:
            assert time.monotonic() < deadline, "the heartbeat never renewed it"
            time.sleep(0.05)
    assert not (tmp_path / WRITER_FILE).exists()
    with pytest.raises(RuntimeError), writer_lease(FS, str(tmp_path)):
        raise RuntimeError("the job failed")
    assert not (tmp_path / WRITER_FILE).exists()


def test_an_optimize_job_holds_its_lease_beside_its_output(
    tiny_models, corpus, tmp_path
):
    """Its output appears only once the artifact is whole; two runs would share
    their step snapshots (``.OUT.steps/``)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("steps:\n  - quantize: {method: bf16}\n")
    held_by(tmp_path, socket.gethostname(), os.getpid(), 2, ".artifact.writer.json")
    done = CliRunner().invoke(cli, [
        "optimize", "--model", tiny_models["bert"], "--recipe", str(recipe),
        "--calibration", corpus["parquet"], "--output", str(tmp_path / "artifact"),
    ])  # fmt: skip
    assert done.exit_code != 0
    assert (
        f"--output: another lmbatch job is writing {tmp_path / 'artifact'}"
        in done.output
    )


def test_a_renewal_is_never_seen_half_written(tmp_path, monkeypatch):
    """A reader between the renewal's truncation and its write found no writer,
    and a second job would have taken the output (seen once in a full run)."""
    monkeypatch.setattr(lease, "HEARTBEAT_SECONDS", 0.0)  # renewing all the time
    with writer_lease(FS, str(tmp_path)):
        missed = sum(read_writer(FS, str(tmp_path)) is None for _ in range(5000))
    assert missed == 0
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing left aside
