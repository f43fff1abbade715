"""The installed ``lmbatch`` command, as a user runs it: its own embedded Ray."""

from __future__ import annotations

import shutil
import subprocess

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
    ids = pq.read_table(out, columns=["id"])["id"].to_pylist()
    assert len(set(ids)) == 240 and f"{second}#119" in ids

    again = lmbatch_infer("--input", str(second), *common)
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr
    assert pq.read_table(out).num_rows == 240
