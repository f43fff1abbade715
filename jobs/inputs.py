"""Input resolution: flags -> a concrete file list, a format and a filesystem.

Runs on the driver before Ray starts, so that a missing file, an empty glob or a
missing column is reported as one line naming the flag. Only the first file's schema
is read here; the readers check every other file as they open it.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.utils import glob_translate

from lmbatch.actors.storage import filesystem_of
from lmbatch.actors.text import may_hold_text
from lmbatch.errors import UserError
from lmbatch.jobs.encodings import (
    UTF8,
    UTF8_BOM,
    csv_read_options,
    decode_line,
    quiet_undecodable_rows,
    read_error,
)
from lmbatch.jobs.output import JOB_FILE

log = logging.getLogger("lmbatch")

FORMATS: dict[str, tuple[str, ...]] = {
    "parquet": (".parquet", ".pq"),
    "jsonl": (".jsonl", ".ndjson", ".json"),
    "csv": (".csv",),
    "tsv": (".tsv", ".tab"),  # CSV's rules, tab-separated
    # Arrow IPC: Hugging Face datasets' save_to_disk (stream), Feather v2 (file).
    "arrow": (".arrow", ".feather", ".ipc"),
}
# JSONL and CSV may be compressed whole, by suffix: pyarrow's input streams (the
# schema read here, Ray Data's reads) detect the codec from the same suffix.
COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")
SEEKABLE = ("parquet", "arrow")  # read from a footer or by batch: never compressed
ARROW_FILE_MAGIC = b"ARROW1"
# A Hugging Face datasets folder (save_to_disk): its data files are those its
# state.json lists; the JSON beside them is metadata, not rows.
HF_STATE = "state.json"
HF_METADATA = ("state.json", "dataset_info.json", "dataset_dict.json")
GLOB_CHARS = "*?["
DELIMITERS = {"csv": ",", "tsv": "\t"}  # the delimited formats, read as CSV


def delimited(
    fmt: str, invalid_row_handler: Callable[[pacsv.InvalidRow], str] | None = None
) -> pacsv.ParseOptions:
    """How a CSV or TSV file parses: quoted values may span lines, and a bad line
    is the row reader's to report (``invalid_row_handler``), skipped elsewhere."""
    return pacsv.ParseOptions(
        delimiter=DELIMITERS[fmt],
        newlines_in_values=True,
        invalid_row_handler=invalid_row_handler or (lambda row: "skip"),
    )


@dataclass(frozen=True)
class ResolvedInputs:
    """Files to read, all of one format on one filesystem."""

    paths: list[str]
    format: str
    filesystem: pafs.FileSystem
    schema: pa.Schema  # of the first file
    encoding: str = UTF8  # of CSV, TSV and JSONL text (--input-encoding)

    @property
    def columns(self) -> list[str]:
        return self.schema.names


def resolve_inputs(
    inputs: list[str],
    input_format: str | None,
    text_column: str,
    id_column: str | None,
    output: str | None = None,
    pair_column: str | None = None,
    encoding: str = UTF8,
) -> ResolvedInputs:
    """Expand paths, globs and directories; check format and columns.

    Args:
        output: the job's ``--output``. Its files are never inputs: a directory or
            glob that holds it (``--input data/ --output data/embeddings/``) skips
            them, and a file inside it is refused, as ``--overwrite`` would delete
            it before the job read it.

    Raises:
        UserError: naming ``--input``, ``--input-format``, ``--input-encoding``,
            ``--text-column``, ``--id-column`` or ``--pair-column``.
    """
    if not inputs:
        raise UserError("--input", "give at least one file, glob or directory")
    filesystem, paths = None, []
    out = filesystem_of(output, "--output") if output is not None else None
    for given in inputs:
        fs, found, outputs = _expand(given)
        if filesystem is not None and type(fs) is not type(filesystem):
            raise UserError(
                "--input", f"{given!r} is on another filesystem than the rest"
            )
        filesystem = fs
        if out is not None and type(out[0]) is type(fs):
            found = _outside(out[1], given, found, output)
            outputs = [o for o in outputs if o != out[1].rstrip("/")]
        paths += _skip_outputs(given, found, outputs)
    fmt = input_format or _format_of(paths)
    if fmt not in FORMATS:
        raise UserError(
            "--input-format", f"unknown format {fmt!r}; use {', '.join(FORMATS)}"
        )
    if input_format is None:
        others = [p for p in paths if _suffix_format(p) != fmt]
        if others:
            folder = others[0].rsplit("/", 1)[0]
            raise UserError(
                "--input",
                f"mixed formats: {others[0]} is not {fmt}; give the files of one, "
                f"such as {folder}/*{FORMATS[fmt][0]}",
            )
    if encoding != UTF8 and fmt in SEEKABLE:
        raise UserError(
            "--input-encoding", f"applies to CSV, TSV and JSONL; {fmt} text is UTF-8"
        )
    paths = sorted(dict.fromkeys(paths))
    first, schema = first_schema(filesystem, paths, fmt, encoding)
    columns = schema.names
    for flag, column in (
        ("--text-column", text_column),
        ("--id-column", id_column),
        ("--pair-column", pair_column),
    ):
        if column is not None and column not in columns:
            tabs = fmt == "csv" and len(columns) == 1 and "\t" in columns[0]
            hint = "; its header is tab-separated: --input-format tsv" if tabs else ""
            raise UserError(flag, no_column(column, first, columns) + hint)
    texts = (("--text-column", text_column), ("--pair-column", pair_column))
    for flag, column in texts if fmt in SEEKABLE else ():  # JSONL's: row by row
        kind = None if column is None else schema.field(column).type
        if kind is not None and not may_hold_text(kind):
            raise UserError(flag, f"{column!r} is {kind} in {first}, not text")
    return ResolvedInputs(paths, fmt, filesystem, schema, encoding)


def first_schema(
    fs: pafs.FileSystem, paths: list[str], fmt: str, encoding: str = UTF8
) -> tuple[str, pa.Schema]:
    """The first file that has columns, and its schema: an empty shard says nothing
    of the others."""
    for path in paths:
        if not empty_shard(fs, path, fmt):
            return path, read_schema(fs, path, fmt, encoding)
    which = (
        f"all {len(paths):,} input files are empty (0 bytes; {paths[0]} first)"
        if len(paths) > 1
        else f"{paths[0]} is empty (0 bytes)"
    )
    raise UserError("--input", f"{which}: no rows, no columns to read")


def empty_shard(fs: pafs.FileSystem, path: str, fmt: str) -> bool:
    """A JSONL or CSV file of zero bytes, as Spark and Dask write for a partition
    with no rows (an empty Parquet or Arrow file still has its schema)."""
    return fmt not in SEEKABLE and not fs.get_file_info(path).size


def no_column(name: str, where: str, names: list[str]) -> str:
    """The message for a column the input lacks: its columns, or for a wide table
    their count and the closest names (thousands of names are not one line)."""
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    if len(names) <= 10:
        return f"no column {name!r} in {where} (has {names}){hint}"
    shown = ", ".join(map(repr, names[:5]))
    return f"no column {name!r} in {where} (has {len(names):,}: {shown}, ...){hint}"


def _outside(out_path: str, given: str, found: list[str], output: str) -> list[str]:
    """``found`` without the files inside the output directory ``out_path``.

    Raises:
        UserError: naming ``--input`` where ``given`` is such a file, or all of its
            files are.
    """
    inside = out_path.rstrip("/") + "/"
    kept = [p for p in found if not p.startswith(inside)]
    if not kept:
        what = found[0] if len(found) == 1 else f"every file of {given}"
        raise UserError(
            "--input",
            f"{what} is inside --output {output}: the job would read what it "
            "writes; write the output elsewhere",
        )
    return kept


def _expand(given: str) -> tuple[pafs.FileSystem, list[str], list[str]]:
    """One --input value -> its files, by the usual glob rules (fsspec's: ``*`` and
    ``?`` stay within a path component, ``**`` crosses directories). Below the
    directory or the glob's fixed part, any component starting with '.' or '_' is
    skipped at every depth (``_SUCCESS``, ``.crc``, an lmbatch output's
    ``_checkpoint/`` and ``_summary.json``), so an lmbatch output read as input gives
    its data files only. Also returned, for a directory: the lmbatch outputs below
    it (``_skip_outputs``); a glob's matches are what the user chose."""
    fs, path = filesystem_of(given, "--input")
    glob_at = [path.find(c) for c in GLOB_CHARS if c in path]
    outputs: list[str] = []
    if glob_at:
        base = path[: min(glob_at)].rsplit("/", 1)[0] or "/"
        pattern = re.compile(glob_translate(path))
        files, _ = _listing(fs, base)
        found = _hf_data_files(
            fs, [p for p in files if pattern.fullmatch(p)]
        )  # data/* in a datasets folder: its data files, not its JSON metadata
        _check_not_metadata(given, found)
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return fs, [path], []
        if info.type == pafs.FileType.NotFound:
            raise UserError("--input", f"no such file or directory: {given}")
        files, outputs = _listing(fs, path)
        found = _hf_data_files(fs, files)
        found = [p for p in found if _suffix_format(p) is not None]
    if not found:
        raise UserError("--input", f"no input files matched {given}")
    return fs, found, outputs


def _skip_outputs(given: str, found: list[str], outputs: list[str]) -> list[str]:
    """A directory's files without those of an earlier infer job's output inside it
    (``--input data/`` after ``--output data/embeddings/``): read again, its rows
    would be rows twice, under other ids. Said on the console; an output given as
    an --input of its own is read.

    Raises:
        UserError: naming ``--input`` where nothing else is left.
    """
    for folder in outputs:
        inside = f"{folder}/"
        found = [p for p in found if not p.startswith(inside)]
        log.warning(
            "--input %s: skipping %s, an earlier lmbatch job's output (it holds %s); "
            "give it as an --input of its own to read it",
            given,
            folder,
            JOB_FILE,
        )
    if not found:
        raise UserError("--input", f"{given} holds only lmbatch outputs: {outputs[0]}")
    return found


def _check_not_metadata(given: str, found: list[str]) -> None:
    """A glob over a ``DatasetDict`` folder (``my_dataset/*``) matches its
    ``dataset_dict.json`` alone (``*`` does not enter the splits' folders): not
    rows, and not JSONL to refuse for a missing column.

    Raises:
        UserError: naming ``--input`` and the folder to give instead.
    """
    names = {p.rpartition("/")[2] for p in found}
    if names and names <= set(HF_METADATA):
        raise UserError(
            "--input",
            f"{given} matches Hugging Face datasets metadata only "
            f"({', '.join(sorted(names))}); give the dataset's folder, "
            f"{found[0].rpartition('/')[0]}, to read its data files",
        )


def _hf_data_files(fs: pafs.FileSystem, found: list[str]) -> list[str]:
    """``found`` with each Hugging Face datasets folder's files cut to the data files
    its ``state.json`` lists (not its metadata, nor ``cache-*.arrow`` files of
    ``map``); the files of other folders as they are."""
    folders: dict[str, set[str]] = {}
    for path in found:
        folder, _, name = path.rpartition("/")
        if name == HF_STATE:
            data = _hf_state_files(fs, path)
            if data is not None:
                folders[folder] = {f"{folder}/{n}" for n in data}
    if not folders:
        return found

    def kept(path: str) -> bool:
        folder, _, name = path.rpartition("/")
        if folder in folders:
            return path in folders[folder]
        return name not in HF_METADATA  # a DatasetDict's dataset_dict.json

    return [p for p in found if kept(p)]


def _hf_state_files(fs: pafs.FileSystem, path: str) -> list[str] | None:
    """The data files a datasets ``state.json`` names; None for any other JSON."""
    try:
        with fs.open_input_stream(path) as f:
            state = json.loads(f.read())
        return [entry["filename"] for entry in state["_data_files"]]
    except (ValueError, KeyError, TypeError, OSError):
        return None


def is_arrow_file(f: pa.NativeFile) -> bool:
    """Whether an Arrow IPC file is in the file layout (Feather v2: a footer that
    counts its rows), not the stream layout; ``f`` is left at its start."""
    magic = f.read(len(ARROW_FILE_MAGIC))
    f.seek(0)
    return magic == ARROW_FILE_MAGIC


def arrow_batches(
    f: pa.NativeFile,
) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """An Arrow IPC file's schema and record batches, in either layout: the file
    format (Feather v2, starting with ``ARROW1``) or the stream format (what
    Hugging Face datasets' ``save_to_disk`` writes)."""
    if is_arrow_file(f):
        reader = pa.ipc.open_file(f)
        count = reader.num_record_batches
        return reader.schema, (reader.get_batch(i) for i in range(count))
    reader = pa.ipc.open_stream(f)
    return reader.schema, iter(reader)


def _listing(fs: pafs.FileSystem, base: str) -> tuple[list[str], list[str]]:
    """Files under ``base`` (pyarrow's recursive listing) with no component below it
    starting with '.' or '_'; and the folders below ``base`` that hold an infer
    job's output (its ``_job.json``), from the same listing."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    files = [i.path for i in infos if i.type == pafs.FileType.File]
    below = {path: path[len(base) :].split("/") for path in files}
    kept = [f for f, parts in below.items() if not any(map(_hidden, parts))]
    outputs = sorted(
        folder
        for folder, _, name in (path.rpartition("/") for path in files)
        if name == JOB_FILE and folder != base.rstrip("/")
    )
    return kept, outputs


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _suffix_format(path: str) -> str | None:
    """The format a file's suffix names: ``.jsonl.gz`` is JSONL, ``.parquet.gz``
    nothing (Parquet compresses inside the file)."""
    lower = path.lower()
    inner = lower.removesuffix(next((s for s in COMPRESSED if lower.endswith(s)), ""))
    fmt = next((f for f, sufs in FORMATS.items() if inner.endswith(sufs)), None)
    return None if fmt in SEEKABLE and inner != lower else fmt


def _format_of(paths: list[str]) -> str:
    fmt = _suffix_format(paths[0])
    if fmt is None:
        raise UserError(
            "--input-format",
            f"cannot tell the format of {paths[0]}; pass --input-format",
        )
    return fmt


def read_schema(
    fs: pafs.FileSystem, path: str, fmt: str, encoding: str = UTF8
) -> pa.Schema:
    """The columns of one file and their types, reading only its head: Parquet's
    own; CSV's are text as the file has it; JSONL's those of the first non-null value
    of each key in the first lines."""
    try:
        if fmt == "parquet":
            with fs.open_input_file(path) as f:
                return pq.read_schema(f)
        if fmt == "arrow":
            with fs.open_input_file(path) as f:
                return arrow_batches(f)[0]
        with fs.open_input_stream(path) as f, quiet_undecodable_rows():
            if fmt in DELIMITERS:
                options = csv_read_options(encoding)
                reader = pacsv.open_csv(f, options, parse_options=delimited(fmt))
                return pa.schema([(n, pa.string()) for n in reader.schema.names])
            return _jsonl_schema(_head_lines(f), encoding)
    except (
        pa.ArrowInvalid,
        json.JSONDecodeError,
        UnicodeDecodeError,
        AttributeError,
    ) as e:
        raise UserError(path, f"cannot read as {fmt}: {read_error(e)}") from None


def _jsonl_schema(lines: list[bytes], encoding: str = UTF8) -> pa.Schema:
    first = json.loads(lines[0].decode(encoding)) if lines else {}
    if not isinstance(first, dict):
        raise ValueError("the first line is not a JSON object")
    types: dict[str, pa.DataType] = dict.fromkeys(first, pa.null())
    for line in lines:
        try:
            row = json.loads(decode_line(line, encoding) or "")
        except json.JSONDecodeError:
            continue  # a bad line is the reader's to report, as a row
        for key, value in row.items() if isinstance(row, dict) else ():
            if types.get(key, pa.null()) == pa.null() and value is not None:
                types[key] = pa.array([value]).type
    return pa.schema(
        [(k, pa.string() if t == pa.null() else t) for k, t in types.items()]
    )


def _head_lines(f: pa.NativeFile, limit: int = 1 << 20) -> list[bytes]:
    """The non-empty lines of the first ``limit`` bytes (the last one, cut, dropped
    unless the file ended), without a leading UTF-8 byte-order mark."""
    head = f.read(limit)
    lines = head.removeprefix(UTF8_BOM).split(b"\n")
    if len(head) == limit:
        lines.pop()
    return [line for line in lines if line.strip()][:1000]
