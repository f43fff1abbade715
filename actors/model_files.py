"""Models on shared storage: a URI becomes a local directory, once per node.

``--model`` may be a local directory or any pyarrow filesystem URI (``s3://``,
``gs://``, ``hdfs://``, ``file://`` on a shared mount). A URI is downloaded into this
node's cache, ``$LMBATCH_CACHE`` (default ``~/.cache/lmbatch``), in a directory named
by the digest of the files' content, so two URIs of the same weights share one copy.
An index keyed by the URI and its listing (names, sizes, modification times) finds that
copy again without downloading; a lock makes the actors of one node wait for the first
one's download instead of each fetching the model.

The driver and the tokenize tasks, which may run on nodes that hold no actor (a CPU
head), fetch everything but the weights: in their place the copy holds a record of
the weight files (names, sizes, times) and their safetensors headers (every tensor's
dtype and shape, a few kilobytes read by range), which is all the driver's checks and
the pool's footprint need. A 140 GB model's weights are downloaded where an actor
loads them, and nowhere else.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from lmbatch.actors.storage import filesystem_of, is_local
from lmbatch.errors import UserError

CHUNK = 8 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx")
WEIGHTS_FILE = ".lmbatch-weights.json"  # a weights-free copy's record of its weights
MAX_HEADER = 100 << 20  # safetensors' own limit on a header


def fetch_model(uri: str, weights: bool = True) -> str:
    """A local directory holding the model at ``uri``: the directory itself for a
    local path, else this node's cached copy, downloaded the first time. Without
    ``weights``, the copy holds the configs and tokenizer files only.

    Raises:
        UserError: naming ``--model`` when the URI cannot be read.
    """
    fs, path = filesystem_of(uri, "--model")
    if is_local(fs):
        return path
    files = _listing(fs, path, uri)
    root = cache_root()
    key = hashlib.sha256(json.dumps([uri, files, weights]).encode()).hexdigest()[:32]
    index = root / "index" / f"{key}.json"
    index.parent.mkdir(parents=True, exist_ok=True)
    with open(root / "index" / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download a node; the others wait here
        if index.is_file():
            cached = root / "models" / json.loads(index.read_text())["digest"]
            if (cached / ".complete").is_file():
                return str(cached)
        names = [name for name, _, _ in files]
        record = None
        if not weights:
            held = [f for f in files if f[0].endswith(WEIGHT_SUFFIXES)]
            names = [name for name in names if not name.endswith(WEIGHT_SUFFIXES)]
            record = _weights_record(fs, path, held)
        digest = _download(fs, path, names, root, record)
        index.write_text(json.dumps({"uri": uri, "digest": digest}))
    return str(root / "models" / digest)


def weight_names(model_dir: str) -> list[str]:
    """Every weight file of a model directory (relative names, sorted): its own
    files, or a weights-free copy's record of them."""
    record = _record(Path(model_dir))
    if record is not None:
        return [name for name, _, _ in record["files"]]
    root = Path(model_dir)
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
    )


def safetensors_headers(model_dir: str, names: list[str]) -> Iterator[dict]:
    """The headers of the safetensors files ``names`` (tensor name -> dtype, shape),
    in that order: read from each file, or from a weights-free copy's record, once.

    Raises:
        UserError: naming ``--model`` when a file is no safetensors file.
    """
    record = _record(Path(model_dir))
    for name in names:
        if record is not None:
            yield record["headers"][name]
            continue
        with open(Path(model_dir) / name, "rb") as f:
            yield read_header(f, name)


def read_header(f, name: str) -> dict:
    """The JSON header a safetensors file starts with (its size in 8 bytes, little
    endian, then the header), without the file's ``__metadata__``."""
    size = int.from_bytes(f.read(8), "little")
    try:
        if size > MAX_HEADER:
            raise ValueError(f"a header of {size:,} bytes")
        header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
    except ValueError as e:
        raise UserError("--model", f"{name} is not a safetensors file: {e}") from None
    header.pop("__metadata__", None)
    return header


def _weights_record(
    fs: pafs.FileSystem, path: str, files: list[tuple[str, int, str]]
) -> bytes:
    """What a weights-free copy keeps of the weights: their listing, and each
    safetensors file's header, read from the start of the file alone."""
    headers = {}
    for name, _, _ in files:
        if name.endswith(".safetensors"):
            with fs.open_input_file(f"{path}/{name}") as f:
                headers[name] = read_header(f, name)
    return json.dumps({"files": files, "headers": headers}, sort_keys=True).encode()


def _record(root: Path) -> dict | None:
    file = root / WEIGHTS_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def cache_root() -> Path:
    default = Path.home() / ".cache" / "lmbatch"
    return Path(os.environ.get("LMBATCH_CACHE", default))


def _listing(fs: pafs.FileSystem, path: str, uri: str) -> list[tuple[str, int, str]]:
    """(relative name, size, mtime) of every file under ``path``, sorted."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError("--model", f"cannot list {uri}: {e}") from None
    files = sorted(
        (i.path[len(path) :].lstrip("/"), i.size, str(i.mtime))
        for i in infos
        if i.type == pafs.FileType.File
    )
    if not files:
        raise UserError("--model", f"{uri} holds no files")
    return files


def _download(
    fs: pafs.FileSystem, path: str, names: list[str], root: Path, record: bytes | None
) -> str:
    """Copy every file into the cache, hashing as it streams, and the weights'
    ``record`` in place of the weights; returns the digest that names the copy."""
    (root / "models").mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=root / "models"))
    digest = hashlib.sha256()
    for name in names:
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        digest.update(name.encode() + b"\0")
        with fs.open_input_stream(f"{path}/{name}") as src, open(target, "wb") as dst:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                dst.write(chunk)
    if record is not None:  # the weights by listing and headers: their identity here
        digest.update(WEIGHTS_FILE.encode() + b"\0" + record)
        (staging / WEIGHTS_FILE).write_bytes(record)
    final = root / "models" / digest.hexdigest()[:32]
    if (final / ".complete").is_file():  # the same content under another URI
        shutil.rmtree(staging)
    else:
        shutil.rmtree(final, ignore_errors=True)
        (staging / ".complete").touch()
        staging.rename(final)
    return final.name


FINGERPRINT_FILE = ".lmbatch-fingerprint.json"


def fingerprint(model_dir: str) -> str:
    """A digest of the content of every file that shapes the model's outputs
    (weights, configs, tokenizer, sentence-transformers modules): the identity a
    resumed job checks. Streamed, and cached beside the model (or, where its folder
    is read-only, in the lmbatch cache) under the files' names, sizes and times, so a
    15 GB model is hashed once. A copy from a URI is named by its digest already; a
    weights-free copy's digest takes the weights by their record (names, sizes and
    times at the URI, and headers), since their content was never read."""
    root = Path(model_dir)
    if root.parent == cache_root() / "models":
        return root.name
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.suffix != ".md"
    )
    listing = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
               for p in files]  # fmt: skip
    key = hashlib.sha256(json.dumps([str(root.resolve()), listing]).encode())
    # Beside the model, or where its folder is read-only, in the lmbatch cache.
    places = (root / FINGERPRINT_FILE, _fingerprints() / f"{key.hexdigest()}.json")
    for cached in places:
        if cached.is_file():
            known = json.loads(cached.read_text())
            if known.get("listing") == json.loads(json.dumps(listing)):
                return known["digest"]
    digest = hashlib.sha256()
    for path, (name, _, _) in zip(files, listing, strict=True):
        digest.update(name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    record = {"listing": listing, "digest": digest.hexdigest()[:32]}
    for cached in places:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(record))
            break
        except OSError:  # a read-only model folder
            continue
    return record["digest"]


def _fingerprints() -> Path:
    return cache_root() / "fingerprints"
