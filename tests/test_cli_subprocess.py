"""The installed ``lmbatch`` command, as a user runs it: its own embedded Ray."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
from ray_head import LMBATCH  # beside this Python: make test doesn't activate .venv


def lmbatch_infer(*args: str) -> subprocess.CompletedProcess:
    assert LMBATCH.exists(), "the console script is installed by `pip install -e .`"
    return subprocess.run(
        [str(LMBATCH), "infer", *args], capture_output=True, text=True, timeout=300
    )


def test_lmbatch_infer_end_to_end(tiny_models, corpus, tmp_path):
    second = tmp_path / "more.jsonl"
    shutil.copy(corpus["jsonl"], second)
    out = tmp_path / "out"
    common = ("--model", tiny_models["gpt2"], "--task", "score", "--output", str(out))
    done = lmbatch_infer("--input", corpus["jsonl"], str(second), *common)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rows 240" in done.stdout and "errors none" in done.stdout
    # Neither Ray's notice that the embedded Ray uses token auth (lmbatch's choice)
    # nor a weight-loading bar per actor reaches the console.
    console = done.stdout + done.stderr
    assert "Token authentication" not in console and "Loading weights" not in console
    ids = pq.read_table(out, columns=["id"])["id"].to_pylist()
    assert len(set(ids)) == 240 and f"{second}#119" in ids

    again = lmbatch_infer("--input", str(second), *common)
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr
    assert pq.read_table(out).num_rows == 240


def test_the_driver_imports_neither_torch_nor_transformers(
    tiny_models, corpus, tmp_path
):
    # Only actors and tasks load a model. The driver's own import of both (3.8 s on 2
    # cores) came before the pool could start, and each actor imports them again.
    out = tmp_path / "out"
    code = (
        "import sys\n"
        "from lmbatch.jobs.run import run_job\n"
        "from lmbatch.jobs.spec import InferSpec\n"
        f"spec = InferSpec.from_flags(model={tiny_models['bert']!r}, task='embed', "
        f"inputs=({corpus['parquet']!r},), output={str(out)!r})\n"
        "print(run_job('infer', spec, None)[2])\n"
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows, imported = done.stdout.splitlines()[-2:]
    assert rows.startswith("rows 120 ") and imported == "[]"
    assert pq.read_table(out).num_rows == 120


def test_a_hub_id_runs_from_this_machines_hub_cache(tiny_models, corpus, tmp_path):
    # The layout `hf download` leaves: a snapshot per revision, refs/main naming it.
    repo = tmp_path / "hub" / "models--lmbatch-test--tiny-bert"
    shutil.copytree(tiny_models["bert"], repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = tmp_path / "out"
    flags = ["--task", "embed", "--input", corpus["parquet"], "--output", str(out)]
    done = subprocess.run(
        [str(LMBATCH), "infer", "--model", "lmbatch-test/tiny-bert", *flags],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rows 120 " in done.stdout
    job = json.loads((out / "_job.json").read_text())
    assert job["model"] == str(repo / "snapshots" / "0123abc")

    missing = subprocess.run(
        [str(LMBATCH), "infer", "--model", "lmbatch-test/not-here", *flags],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert missing.stderr.strip() == (
        "Error: --model: lmbatch-test/not-here is no directory here, nor in the "
        f"Hugging Face cache ({tmp_path / 'hub'}); lmbatch downloads nothing from a "
        "hub: run `hf download lmbatch-test/not-here` first, or give a directory or URI"
    )
