"""Input resolution: flags -> a concrete file list, a format and a filesystem.

Runs on the driver before Ray starts, so that a missing file, an empty glob or a
missing column is reported as one line naming the flag. Only the first file's schema
is read here; the readers check every other file as they open it.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lmbatch.actors.storage import filesystem_of
from lmbatch.errors import UserError

FORMATS: dict[str, tuple[str, ...]] = {
    "parquet": (".parquet", ".pq"),
    "jsonl": (".jsonl", ".ndjson", ".json"),
    "csv": (".csv",),
}
GLOB_CHARS = "*?["


@dataclass(frozen=True)
class ResolvedInputs:
    """Files to read, all of one format on one filesystem."""

    paths: list[str]
    format: str
    filesystem: pafs.FileSystem
    columns: list[str]  # of the first file


def resolve_inputs(
    inputs: list[str], input_format: str | None, text_column: str, id_column: str | None
) -> ResolvedInputs:
    """Expand paths, globs and directories; check format and columns.

    Raises:
        UserError: naming ``--input``, ``--input-format``, ``--text-column`` or
            ``--id-column``.
    """
    if not inputs:
        raise UserError("--input", "give at least one file, glob or directory")
    filesystem, paths = None, []
    for given in inputs:
        fs, found = _expand(given)
        if filesystem is not None and type(fs) is not type(filesystem):
            raise UserError(
                "--input", f"{given!r} is on another filesystem than the rest"
            )
        filesystem = fs
        paths += found
    fmt = input_format or _format_of(paths)
    if fmt not in FORMATS:
        raise UserError(
            "--input-format", f"unknown format {fmt!r}; use {', '.join(FORMATS)}"
        )
    if input_format is None:
        others = [p for p in paths if _suffix_format(p) != fmt]
        if others:
            raise UserError("--input", f"mixed formats: {others[0]} is not {fmt}")
    columns = read_columns(filesystem, paths[0], fmt)
    for flag, column in (("--text-column", text_column), ("--id-column", id_column)):
        if column is not None and column not in columns:
            raise UserError(flag, f"no column {column!r} in {paths[0]} (has {columns})")
    return ResolvedInputs(sorted(dict.fromkeys(paths)), fmt, filesystem, columns)


def _expand(given: str) -> tuple[pafs.FileSystem, list[str]]:
    """One --input value -> its files. Directories recurse; names starting with '.' or
    '_' (``_SUCCESS``, ``.crc``, our own ``_summary.json``) are skipped."""
    fs, path = filesystem_of(given, "--input")
    glob_at = [path.find(c) for c in GLOB_CHARS if c in path]
    if glob_at:
        base = path[: min(glob_at)].rsplit("/", 1)[0] or "/"
        found = _listing(fs, base, lambda p: fnmatch.fnmatch(p, path))
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return fs, [path]
        if info.type == pafs.FileType.NotFound:
            raise UserError("--input", f"no such file or directory: {given}")
        found = _listing(fs, path, lambda p: _suffix_format(p) is not None)
    if not found:
        raise UserError("--input", f"no input files matched {given}")
    return fs, found


def _listing(fs: pafs.FileSystem, base: str, keep: Callable[[str], bool]) -> list[str]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and not i.base_name.startswith((".", "_"))
        and keep(i.path)
    ]


def _suffix_format(path: str) -> str | None:
    lower = path.lower()
    return next((f for f, sufs in FORMATS.items() if lower.endswith(sufs)), None)


def _format_of(paths: list[str]) -> str:
    fmt = _suffix_format(paths[0])
    if fmt is None:
        raise UserError(
            "--input-format",
            f"cannot tell the format of {paths[0]}; pass --input-format",
        )
    return fmt


def read_columns(fs: pafs.FileSystem, path: str, fmt: str) -> list[str]:
    """Column names of one file, reading only its head."""
    try:
        if fmt == "parquet":
            with fs.open_input_file(path) as f:
                return list(pq.read_schema(f).names)
        with fs.open_input_stream(path) as f:
            if fmt == "csv":
                return list(pacsv.open_csv(f).schema.names)
            first = _first_line(f)
            return list(json.loads(first).keys()) if first.strip() else []
    except (
        pa.ArrowInvalid,
        json.JSONDecodeError,
        UnicodeDecodeError,
        AttributeError,
    ) as e:
        raise UserError(
            path, f"cannot read as {fmt}: {str(e).splitlines()[0]}"
        ) from None


def _first_line(f: pa.NativeFile, chunk: int = 1 << 20) -> bytes:
    head = b""
    while b"\n" not in head:
        more = f.read(chunk)
        if not more:
            break
        head += more
    return head.split(b"\n", 1)[0]
