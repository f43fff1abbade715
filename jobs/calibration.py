"""optimize's text: calibration and evaluation rows read from the same files, formats
and object stores an infer job reads, as plain strings or, with ``--pair-column``,
text pairs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from lmbatch.actors.text import is_text
from lmbatch.errors import UserError
from lmbatch.jobs.encodings import (
    UTF8,
    csv_read_options,
    quiet_undecodable_rows,
    read_error,
)
from lmbatch.jobs.inputs import (
    SEEKABLE,
    arrow_batches,
    delimited,
    empty_shard,
    resolve_inputs,
)

if TYPE_CHECKING:
    from lmbatch.optimize.calibrate import Row


def read_texts(
    given: tuple[str, ...],
    column: str,
    limit: int,
    flag: str,
    output: str | None = None,
    pair: str | None = None,
    encoding: str = UTF8,
) -> list[Row]:
    """Up to ``limit`` non-empty strings of ``column`` (with ``pair``, text pairs
    whose both texts are non-empty), files in order; none from inside ``output``
    (the artifact's directory, which --overwrite empties)."""
    names = [column] if pair is None else [column, pair]
    try:
        inputs = resolve_inputs(list(given), None, column, None, output, pair, encoding)
    except UserError as e:  # --input is what resolve_inputs calls it; name ours
        raise UserError(flag if e.where == "--input" else e.where, e.message) from None
    rows: list[Row] = []
    fs = inputs.filesystem
    # Parquet and Arrow read a footer first; a stream decompresses a .jsonl.gz.
    opened = fs.open_input_file if inputs.format in SEEKABLE else fs.open_input_stream
    for path in inputs.paths:
        if empty_shard(fs, path, inputs.format):
            continue  # no text, and pyarrow's CSV reader refuses it
        try:
            with opened(path) as f, quiet_undecodable_rows():
                table = _read_table(f, inputs.format, names, encoding)
        except (pa.ArrowInvalid, UnicodeDecodeError) as e:
            raise UserError(flag, f"cannot read {path}: {read_error(e)}") from None
        rows += _text_rows(table, names, path, flag)
        if len(rows) >= limit:
            break
    if not rows:
        both = f" and {pair!r}" if pair else ""
        raise UserError(flag, f"no text in column {column!r}{both}")
    return rows[:limit]


def _read_table(
    f: pa.NativeFile, fmt: str, names: list[str], encoding: str
) -> pa.Table:
    """One file's table; CSV and TSV transcoded by pyarrow, JSONL here (pyarrow's
    JSON reader takes UTF-8 only: a calibration file is read whole anyway)."""
    if fmt in ("csv", "tsv"):
        options = csv_read_options(encoding)
        return pacsv.read_csv(f, options, parse_options=delimited(fmt))
    if fmt == "jsonl" and encoding == UTF8:
        return pajson.read_json(f)
    if fmt == "jsonl":
        return pajson.read_json(pa.BufferReader(f.read().decode(encoding).encode()))
    if fmt == "parquet":
        return pq.read_table(f, columns=names)
    return _arrow_columns(f, names)


def _text_rows(table: pa.Table, names: list[str], path: str, flag: str) -> list[Row]:
    """The rows whose every column of ``names`` holds text that is not blank."""
    columns = []
    for name in names:
        if name not in table.column_names:  # CSV and JSONL are read whole
            raise UserError(flag, f"no column {name!r} in {path}")
        kind = table[name].type
        if not is_text(kind):
            hint = (  # pyarrow's CSV reader keeps cells that are not UTF-8 as bytes
                ": bytes that are not UTF-8 (--input-encoding names the file's)"
                if pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
                else ""
            )
            raise UserError(flag, f"column {name!r} of {path} is not text{hint}")
        columns.append(table[name].to_pylist())
    rows = [r for r in zip(*columns, strict=True) if all(t and t.strip() for t in r)]
    return [r[0] for r in rows] if len(names) == 1 else rows


def _arrow_columns(f: pa.NativeFile, names: list[str]) -> pa.Table:
    schema, batches = arrow_batches(f)
    for name in names:
        if name not in schema.names:
            raise pa.ArrowInvalid(f"no column {name!r}")
    kept = pa.schema([schema.field(name) for name in names])
    return pa.Table.from_batches([b.select(names) for b in batches], kept)
