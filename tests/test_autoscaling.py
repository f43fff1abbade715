"""Jobs on a cluster whose GPU nodes its autoscaler starts (Ray's fake multi-node
provider on this machine). Its GPU nodes declare GPUs but have no CUDA: their actors
run on CPU and say so, which is what a broken driver would look like too."""

from __future__ import annotations

import json
import time
import urllib.request

import pyarrow.parquet as pq
import pytest
from ray_head import start_head
from test_cluster import lmbatch

from lmbatch.actors.predictor import NO_CUDA

pytestmark = pytest.mark.cluster
# Two GPU node types of different memory, one node of each at most; none at first.
WORKERS = {
    "gpu.small": {"resources": {"CPU": 1, "GPU": 1, "gpu_2gb": 1}, "max_workers": 1},
    "gpu.large": {"resources": {"CPU": 1, "GPU": 1, "gpu_8gb": 1}, "max_workers": 1},
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    head = start_head(tmp_path_factory.mktemp("autoscaling"), autoscaling=WORKERS)
    yield head
    head.stop()


def infer(cluster, tiny_models, corpus, out, *flags: str):
    return lmbatch(
        cluster,
        "infer", "--model", tiny_models["bert"], "--task", "embed",
        "--input", corpus["parquet"], "--id-column", "doc", "--output", str(out),
        "--address", cluster.address, *flags,
    )  # fmt: skip


def succeeds(cluster, tiny_models, corpus, out, *flags: str):
    """(the command's output, the job's summary) of a job that must succeed."""
    done = infer(cluster, tiny_models, corpus, out, *flags)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, json.loads((out / "_summary.json").read_text())


def test_a_gpu_job_has_the_autoscaler_start_a_gpu_node(
    cluster, tiny_models, corpus, tmp_path
):
    out = tmp_path / "out"
    printed, summary = succeeds(cluster, tiny_models, corpus, out, "--device", "cuda")
    ids = pq.read_table(out, columns=["id"])["id"].to_pylist()
    assert sorted(ids) == [f"doc-{i:03d}" for i in range(120)]
    assert summary["ran"] == [f"{NO_CUDA} in fp32"]
    # On a node the autoscaler started (the fake provider's ids), not the head.
    assert all(a["node"].startswith("ffffffff") for a in summary["actors"])
    assert summary["pool"].startswith("1 GPU actors, 1 per GPU, on 1 GPUs")
    # Sized for the smaller of the two GPU types, before either had started.
    assert "up to 2; sized for the smallest, 2 GB (gpu.small)" in summary["pool"]
    # The job said what it waited for (the node, then its actor), not silence.
    assert "(waiting for 1 of 1 GPU actors" in printed


def test_auto_takes_the_gpus_the_autoscaler_can_add(
    cluster, tiny_models, corpus, tmp_path
):
    _, summary = succeeds(cluster, tiny_models, corpus, tmp_path / "out", "--gpus", "2")
    assert summary["rows"] == 120
    assert summary["pool"].startswith("2 GPU actors, 1 per GPU, on 2 GPUs")
    # The whole pool was asked for, so the autoscaler brought up a node of each type
    # (120 rows may be done before the second node's actor starts: the pool does
    # not wait to dispatch).
    assert all(a["node"].startswith("ffffffff") for a in summary["actors"])
    deadline = time.monotonic() + 60
    while gpus_up(cluster) < 2:
        assert time.monotonic() < deadline, "the autoscaler did not add the GPUs"
        time.sleep(1)


def gpus_up(cluster) -> int:
    """GPUs of the cluster's live nodes, as its dashboard lists them."""
    request = urllib.request.Request(
        cluster.address + "/api/v0/nodes",
        headers={"Authorization": f"Bearer {cluster.token_path.read_text().strip()}"},
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        nodes = json.loads(r.read())["data"]["result"]["result"]
    alive = [n for n in nodes if n["state"] == "ALIVE"]
    return int(sum(n["resources_total"].get("GPU", 0) for n in alive))


def test_more_gpus_than_the_cluster_can_have_is_one_line(
    cluster, tiny_models, corpus, tmp_path
):
    done = infer(cluster, tiny_models, corpus, tmp_path / "out", "--gpus", "3")
    assert done.returncode == 1
    errors = [line for line in done.stdout.splitlines() if "Error: " in line]
    assert errors == [
        "Error: --gpus: 3 GPUs asked for; the cluster can have at most 2"
    ], done.stdout[-2000:]
