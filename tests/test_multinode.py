"""An infer job on a local three-node Ray spreads its actors over the nodes, each
sizing its batches to its own node's memory, and every row arrives once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import write_rows

pytestmark = pytest.mark.cluster
SCRIPT = Path(__file__).with_name("multinode_run.py")


def run_script(*args) -> dict:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_actors_spread_over_nodes_each_with_its_own_budget(tiny_models, tmp_path):
    # Six files: six read tasks, so blocks exist for every actor to take some.
    data, out = tmp_path / "rows", tmp_path / "out"
    data.mkdir()
    for i in range(6):
        write_rows(data / f"part-{i}.jsonl", 100, start=100 * i)
    # Ray Data hands a block to the least busy actor: were each block done before the
    # next one is tokenized, the first actor would be the least busy every time and
    # take them all. 48 new tokens a row (of the tiny model's 64 positions) keep an
    # actor busy that long.
    result = run_script(
        tiny_models["gpt2"], data, out, "task=generate", "batch_rows=20",
        "max_new_tokens=48",
    )  # fmt: skip
    summary, nodes = result["summary"], result["nodes"]

    ids = pq.read_table(out, columns=["id"])["id"].to_pylist()
    assert len(ids) == 600 and len(set(ids)) == 600
    assert summary["rows"] == 600 and summary["errors"] == {}

    actors = summary["actors"]
    assert len(actors) == 3
    assert len({a["node"] for a in actors}) == 3, "one actor on each node"
    assert sum(a["rows"] for a in actors) == 600
    spread = [a["rows"] for a in actors]
    assert sum(r > 0 for r in spread) >= 2, f"rows went to one node only: {spread}"
    for a in actors:  # each sized to a share of its own node's memory
        assert a["memory_limit_bytes"] <= nodes[a["node"]]
    assert len({a["memory_limit_bytes"] for a in actors}) == 3


@pytest.mark.fault("a worker node removed mid-job (multi-node local Ray)")
def test_a_worker_node_removed_mid_job_loses_nothing(
    tiny_models, tmp_path, fault_report
):
    data = tmp_path / "rows.jsonl"
    write_rows(data, 1200)
    out = tmp_path / "out"
    result = run_script(
        tiny_models["gpt2"], data, out, "--remove-node", "task=generate",
        "batch_rows=20",
    )  # fmt: skip
    assert result["removed"], "the job ended before a node could be removed"
    assert result["removed"][0] not in result["nodes"]
    ids = pq.read_table(out, columns=["id"])["id"].to_pylist()
    assert len(ids) == 1200 and len(set(ids)) == 1200
    assert result["summary"]["errors"] == {}
    started = sum(a["rows_started"] for a in result["summary"]["actors"])
    fault_report(1200, ids, started)
