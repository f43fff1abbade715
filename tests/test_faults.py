"""Faults a long job meets, on a real local Ray: an actor killed mid-job is restarted
and its rows retried; nothing is lost or duplicated."""

from __future__ import annotations

import os
import signal
import threading
import time

import pyarrow.dataset as pads
import pytest
from helpers import run_job, working_actors, write_rows


def kill_a_busy_actor(killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the first actor of the running job that did work."""
    while not stop.is_set() and not killed:
        busy = working_actors()
        if busy:
            os.kill(busy[0]["pid"], signal.SIGKILL)
            killed.append(busy[0]["pid"])
            return
        time.sleep(0.05)


@pytest.mark.fault("an actor process killed (SIGKILL by pid) mid-job")
def test_a_killed_actor_is_restarted_and_its_rows_retried(
    ray_local, tiny_models, tmp_path, fault_report
):
    data = tmp_path / "rows.jsonl"
    write_rows(data, 1500)
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(
        target=kill_a_busy_actor, args=(killed, stop), daemon=True
    )
    killer.start()
    try:
        _, summary = run_job(
            tmp_path / "out", model=tiny_models["gpt2"], inputs=str(data),
            task="generate", max_new_tokens=8, batch_rows=25,
        )  # fmt: skip
    finally:
        stop.set()
        killer.join()
    assert killed, "the job ended before an actor could be killed"
    ids = pads.dataset(tmp_path / "out").to_table(columns=["id"])["id"].to_pylist()
    assert len(ids) == 1500 and len(set(ids)) == 1500
    assert summary.errors == {}
    # Ray restarted the actor under the same id, in a new process: both lives report.
    (actor,) = {a["actor"] for a in summary.actors if a["pid"] == killed[0]}
    assert len([a for a in summary.actors if a["actor"] == actor]) == 2
    fault_report(1500, ids, sum(a["rows_started"] for a in summary.actors))
