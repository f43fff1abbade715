"""Models, inputs, outputs and artifacts on object storage: an S3-compatible server
(moto) on loopback, reached through pyarrow's S3 filesystem with an endpoint
override. A model is read from it into each node's cache, outputs and an optimize
artifact are written to it, and a second job reads the artifact back from there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest
from ray_head import free_port

from lmbatch.actors.footprint import model_bytes
from lmbatch.actors.model_files import (
    WEIGHT_SUFFIXES,
    cache_root,
    fetch_model,
    fingerprint,
)

pytestmark = pytest.mark.usefixtures("ray_local")


class Bucket:
    """A bucket on the loopback S3 server: ``uri(path)`` for lmbatch's flags."""

    def __init__(self, port: int) -> None:
        self.query = f"endpoint_override=127.0.0.1:{port}&scheme=http"
        self.fs, _ = pafs.FileSystem.from_uri(
            f"s3://key:secret@lmbatch?{self.query}&allow_bucket_creation=true"
        )
        self.fs.create_dir("lmbatch")

    def uri(self, path: str) -> str:
        return f"s3://key:secret@lmbatch/{path}?{self.query}"

    def upload(self, local: str, path: str) -> str:
        pafs.copy_files(local, f"lmbatch/{path}", destination_filesystem=self.fs)
        return self.uri(path)

    def table(self, path: str):
        return pads.dataset(f"lmbatch/{path}", filesystem=self.fs).to_table()


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
         "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    yield Bucket(port)
    os.kill(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


def embeddings(table) -> dict[str, np.ndarray]:
    rows = table.to_pylist()
    return {r["id"]: np.asarray(r["embedding"]) for r in rows}


def test_model_inputs_and_output_on_object_storage(
    bucket, tiny_models, corpus, embedded_corpus
):
    model = bucket.upload(tiny_models["bert"], "models/bert")
    data = bucket.upload(corpus["parquet"], "data/rows.parquet")
    summary = run_job_on_s3(bucket, model, data, "out/emb")
    assert summary.rows == 120 and summary.errors == {}
    local, _ = embedded_corpus
    remote = embeddings(bucket.table("out/emb"))
    assert remote.keys() == local.keys()
    for key, row in local.items():
        np.testing.assert_allclose(remote[key], row["embedding"], atol=1e-6)


def run_job_on_s3(bucket: Bucket, model: str, data: str, out: str):
    from lmbatch.jobs.infer import run_infer
    from lmbatch.jobs.spec import InferSpec, prepare_infer

    spec = InferSpec.from_flags(
        model=model, inputs=(data,), task="embed", id_column="doc",
        output=bucket.uri(out),
    )  # fmt: skip
    return run_infer(prepare_infer(spec))


def test_a_node_downloads_a_model_once_into_a_cache_keyed_by_content(
    bucket, tiny_models
):
    first = bucket.upload(tiny_models["bert"], "models/once")
    again = bucket.upload(tiny_models["bert"], "models/same-weights-elsewhere")
    path = fetch_model(first)
    assert Path(path).parent == cache_root() / "models"
    stamp = (Path(path) / ".complete").stat().st_mtime_ns
    assert fetch_model(first) == path  # no second download: the index found it
    assert fetch_model(again) == path  # the same content under another URI
    assert (Path(path) / ".complete").stat().st_mtime_ns == stamp
    assert (Path(path) / "config.json").read_text() == (
        Path(tiny_models["bert"]) / "config.json"
    ).read_text()


def test_the_tokenize_stage_fetches_a_model_without_its_weights(bucket, tiny_models):
    from lmbatch.actors.tokenize import load_tokenizer

    uri = bucket.upload(tiny_models["bert"], "models/tokenizer-only")
    path = Path(fetch_model(uri, weights=False))
    names = {p.name for p in path.iterdir()}
    assert "config.json" in names and not any(n.endswith(".safetensors") for n in names)
    assert path != Path(fetch_model(uri))  # the whole model is a copy of its own
    tokenizer = load_tokenizer(uri)
    assert tokenizer("a text")["input_ids"]


def test_the_driver_checks_a_model_on_object_storage_without_its_weights(
    bucket, tiny_models, corpus, tmp_path, monkeypatch
):
    """On a cluster the driver runs on the head, which holds no actor: it checks the
    model and sizes the pool from configs and safetensors headers, and downloads no
    weights (a 140 GB model would not fit there)."""
    from lmbatch.jobs.spec import InferSpec, prepare_infer

    monkeypatch.setenv("LMBATCH_CACHE", str(tmp_path / "cache"))
    uri = bucket.upload(tiny_models["bert"], "models/for-the-driver")
    spec = InferSpec.from_flags(
        model=uri, inputs=(corpus["parquet"],), task="embed",
        output=str(tmp_path / "out"),
    )  # fmt: skip
    plan = prepare_infer(spec)
    fetched = [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert "config.json" in fetched
    assert not any(name.endswith(WEIGHT_SUFFIXES) for name in fetched)
    for precision in ("fp32", "fp16", "int8", "nf4"):
        assert model_bytes(plan.model_dir, precision) == model_bytes(
            tiny_models["bert"], precision
        )
    # Other weights of the same size at the same URI: another model to --resume.
    weights = bytearray((Path(tiny_models["bert"]) / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    time.sleep(1.1)  # the store's modification times count whole seconds
    with bucket.fs.open_output_stream(
        "lmbatch/models/for-the-driver/model.safetensors"
    ) as f:
        f.write(bytes(weights))
    assert fingerprint(prepare_infer(spec).model_dir) != fingerprint(plan.model_dir)


def test_an_optimize_artifact_written_to_object_storage_and_read_back(
    bucket, tiny_models, corpus, tmp_path
):
    from lmbatch.jobs.optimize import prepare_optimize, run_optimize
    from lmbatch.jobs.spec import OptimizeSpec

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("steps:\n  - lowrank: {rank_ratio: 0.5, min_saving: 0.0}\n")
    data = bucket.upload(corpus["parquet"], "data/calibration.parquet")
    spec = OptimizeSpec.from_flags(
        model=bucket.upload(tiny_models["bert"], "models/to-optimize"),
        recipe=str(recipe), calibration=(data,), output=bucket.uri("artifacts/a1"),
    )  # fmt: skip
    run_optimize(prepare_optimize(spec))
    with bucket.fs.open_input_stream("lmbatch/artifacts/a1/lmbatch.json") as f:
        meta = json.loads(f.read())
    assert [s["name"] for s in meta["steps"]] == ["original", "1. lowrank"]
    summary = run_job_on_s3(
        bucket, bucket.uri("artifacts/a1"), data, "out/from-artifact"
    )
    assert summary.rows == 120 and summary.errors == {}
