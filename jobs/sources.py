"""Ray Data readers that give every row a stable id, a checked text, and the input
columns the user keeps.

Ray's file-based datasource does discovery, filesystems, retries and parallel read
tasks; we override only ``_read_stream`` (its extension point) to add what Ray's own
readers lack for every format: the row's position in its file, so that the id
``<path>#<row>`` is stable across re-runs, one normalisation of the text column (null,
empty or non-string text becomes an ``error`` value, never a crashed read), and bad
input as bad rows: a malformed CSV line or JSONL line, or a kept cell that does not
convert to its column's type, is that row's ``error`` and the file goes on. Only a
file that cannot be read at all becomes one ``bad_file`` row.

Every block leaves here with ``id``, ``_text``, ``_error``, ``_pair`` where the job
reads text pairs (``--pair-column``), and the kept columns.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray.data
from ray.data.datasource import FileBasedDatasource

from lmbatch.actors.text import check_text, json_kind
from lmbatch.jobs.encodings import (
    UTF8,
    UTF8_BOM,
    csv_read_options,
    decode_line,
    quiet_undecodable_rows,
    read_error,
)
from lmbatch.jobs.inputs import ResolvedInputs, arrow_batches, delimited

ROW_FIELDS = [("id", pa.string()), ("_text", pa.string()), ("_error", pa.string())]
PAIR_FIELD = ("_pair", pa.string())  # a text pair's second text
JSONL_CHUNK_ROWS = 4096
READ_ERRORS = (pa.ArrowException, OSError, ValueError)  # what an unreadable file raises


@dataclass(frozen=True)
class Columns:
    """The input columns a job reads."""

    text: str
    id: str | None = None
    keep: dict[str, pa.DataType] = field(default_factory=dict)  # name -> its type
    pair: str | None = None  # the second text of each row's pair

    def schema(self) -> pa.Schema:
        pair = [PAIR_FIELD] if self.pair else []
        return pa.schema(ROW_FIELDS + pair + list(self.keep.items()))

    @property
    def names(self) -> list[str]:
        """The input columns to read, each once."""
        wanted = (self.text, self.pair, self.id, *self.keep)
        return list(dict.fromkeys(n for n in wanted if n))

    @property
    def texts(self) -> list[str]:
        """The columns read as text: the text, and the pair's second text."""
        return [self.text, *([self.pair] if self.pair else [])]


class _RowSource(FileBasedDatasource):
    """Base: subclasses yield raw Arrow tables with ``_row`` (the row's position in
    its file) and, where they found a row bad, ``_bad``; this adds ids, checks text
    and conforms the kept columns."""

    def __init__(
        self, paths: list[str], columns: Columns, encoding: str = UTF8, **kw
    ) -> None:
        super().__init__(paths, **kw)
        self._columns = columns
        self._encoding = encoding  # of CSV, TSV and JSONL text

    def _tables(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        raise NotImplementedError

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        tables = self._tables(f, path)
        position = 0
        while True:
            try:  # reading only: a bug in what follows is a bug, not bad data
                table = next(tables, None)
            except READ_ERRORS as e:
                yield self._unreadable(path, position, e)
                return
            if table is None:
                return
            if table.num_rows:
                position = max(position, pc.max(table["_row"]).as_py() + 1)
                yield self._checked(table, path)

    def _unreadable(self, path: str, position: int, e: Exception) -> pa.Table:
        """A corrupt or truncated file: one row says where reading stopped and why;
        the job and the other files go on."""
        error = f"bad_file: {path} unreadable from row {position}: {read_error(e)}"
        schema = self._columns.schema()
        row = {"id": [f"{path}#{position}"], "_error": [error]}
        return pa.table(
            [pa.array(row.get(f.name, [None]), f.type) for f in schema], schema=schema
        )

    def _checked(self, table: pa.Table, path: str) -> pa.Table:
        # Only the first file is checked before the job; a later file without a
        # column gives rows with an error naming it, never a crashed job.
        c = self._columns
        wanted = [*c.texts, *([c.id] if c.id else []), *c.keep]
        missing = [name for name in wanted if name not in table.column_names]
        for name in missing:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
        out = self._normalise(table, path)
        if missing:
            error = f"missing_column: {path} has no column {missing[0]!r}"
            out = out.set_column(2, "_error", pa.array([error] * len(out), pa.string()))
        return out

    def _normalise(self, table: pa.Table, path: str) -> pa.Table:
        """ids, text, errors and kept columns; what a reader found wrong with a row
        (``_bad``, e.g. bad UTF-8) comes before the text checks."""
        c = self._columns
        derived = pc.binary_join_element_wise(
            f"{path}#", pc.cast(table["_row"], pa.string()), ""
        )
        ids, missing = derived, None
        if c.id is not None:  # an empty id is none: CSV's missing value, no key
            given = pc.cast(table[c.id], pa.string())
            missing = pc.fill_null(pc.equal(given, ""), True)
            ids = pc.if_else(missing, derived, given)
        text, error = check_text(table[c.text])
        pair = []
        if c.pair is not None:
            second, pair_error = check_text(table[c.pair], f"{c.pair!r}")
            error, pair = pc.coalesce(error, pair_error), [second]
        if missing is not None:
            error = pc.if_else(
                pc.and_(missing, pc.is_null(error)),
                f"null_id: {c.id!r} is null or empty; the row's id is file#row",
                error,
            )
        kept = []
        for name, kind in c.keep.items():
            values, bad = conform(table[name], kind, name)
            kept.append(values)
            error = pc.coalesce(error, bad)
        if "_bad" in table.column_names:
            error = pc.coalesce(table["_bad"], error)
        return pa.table([ids, text, error, *pair, *kept], schema=c.schema())


def conform(
    values: pa.ChunkedArray | pa.Array | list, kind: pa.DataType, name: str
) -> tuple[pa.Array, pa.Array]:
    """A kept column (Arrow, or the Python values of a JSONL chunk) as ``kind``, its
    type in the first input file, and per row the error of a cell that does not
    convert (that cell becomes null)."""
    mismatch = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError)
    no_error = pa.nulls(len(values), pa.string())
    try:
        if isinstance(values, list):
            return pa.array(values, kind), no_error
        values = (
            values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        )
        return (values if values.type == kind else pc.cast(values, kind)), no_error
    except mismatch:
        cells = values if isinstance(values, list) else values.to_pylist()
    converted, errors = [], []
    for value in cells:
        try:
            converted.append(pa.array([value], kind)[0].as_py())
            errors.append(None)
        except mismatch:
            converted.append(None)
            errors.append(f"bad_value: column {name!r}: {value!r} is not {kind}")
    return pa.array(converted, kind), pa.array(errors, pa.string())


def _positioned(table: pa.Table, start: int) -> pa.Table:
    return table.append_column(
        "_row", pa.array(range(start, start + table.num_rows), pa.int64())
    )


class ParquetRows(_RowSource):
    _FILE_EXTENSIONS = ["parquet", "pq"]

    def _open_input_source(self, filesystem, path: str, **open_args) -> pa.NativeFile:
        # Parquet reads its footer first: seekable.
        return filesystem.open_input_file(path)

    def _tables(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        pfile = pq.ParquetFile(f)
        schema = pfile.schema_arrow
        wanted = [n for n in self._columns.names if n in schema.names]
        batches = pfile.iter_batches(columns=wanted or None)
        yield from _batch_tables(batches, schema, self._columns)


class ArrowRows(_RowSource):
    """Arrow IPC files, either layout (``inputs.arrow_batches``): Hugging Face
    datasets saved to disk, Feather v2. Read batch by batch, only the wanted
    columns; text stored as bytes is decoded as Parquet's is."""

    _FILE_EXTENSIONS = ["arrow", "feather", "ipc"]

    def _open_input_source(self, filesystem, path: str, **open_args) -> pa.NativeFile:
        # The file format reads its footer first: seekable.
        return filesystem.open_input_file(path)

    def _tables(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        schema, batches = arrow_batches(f)
        wanted = [n for n in self._columns.names if n in schema.names]
        selected = (batch.select(wanted) for batch in batches)
        yield from _batch_tables(selected, schema, self._columns)


class CSVRows(_RowSource):
    """Text, id and kept columns as bytes, decoded here: as strings "007" would
    become 7, "" a null, and one invalid UTF-8 byte would fail the whole file (a
    kept CSV column is text, as the file has it). A line that does not parse (a
    field too many or too few) is skipped by pyarrow's ``invalid_row_handler`` and
    comes back as an error row at its own position. A file in another encoding
    (--input-encoding) is transcoded to UTF-8 by pyarrow as it is read."""

    _FILE_EXTENSIONS = ["csv"]
    FORMAT = "csv"

    def _tables(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        with quiet_undecodable_rows():
            yield from self._parsed(f)

    def _parsed(self, f: pa.NativeFile) -> Iterator[pa.Table]:
        columns = self._columns.names
        invalid: list[pacsv.InvalidRow] = []

        def skip(row: pacsv.InvalidRow) -> str:
            invalid.append(row)
            return "skip"

        try:
            reader = pacsv.open_csv(
                f,
                read_options=csv_read_options(self._encoding, use_threads=False),
                parse_options=delimited(self.FORMAT, skip),
                convert_options=pacsv.ConvertOptions(
                    column_types=dict.fromkeys(columns, pa.binary())
                ),
            )
        except pa.ArrowInvalid as e:
            if str(e).startswith(EMPTY_CSV):  # an empty shard: no rows, not bad ones
                return
            raise
        positions = _Positions()
        for batch in reader:
            positions.skip(row.number - 2 for row in invalid)  # 1: the header row
            table = pa.Table.from_batches([batch])
            yield self._decoded(table, columns, positions.take(table.num_rows))
            if invalid:
                yield self._invalid(table.schema, invalid)
                invalid.clear()

    def _decoded(self, table: pa.Table, columns: list[str], rows: np.ndarray):
        table = _decoded(table, columns)
        return table.append_column("_row", pa.array(rows, pa.int64()))

    def _invalid(self, schema: pa.Schema, rows: list[pacsv.InvalidRow]) -> pa.Table:
        columns = {
            f.name: pa.nulls(len(rows), pa.string()) for f in schema if f.name
        }  # every field null: the row has no values to trust
        columns["_bad"] = pa.array(
            [
                f"bad_csv: line has {r.actual_columns} fields, expected "
                f"{r.expected_columns}"
                for r in rows
            ],
            pa.string(),
        )
        columns["_row"] = pa.array([r.number - 2 for r in rows], pa.int64())
        return pa.table(columns)


EMPTY_CSV = "Empty CSV file"  # pyarrow's error for a file of no bytes


class _Positions:
    """Row positions in a CSV file for the rows that parsed: counting, and
    stepping over the positions of rows that did not."""

    def __init__(self) -> None:
        self.next = 0
        self.skipped: set[int] = set()

    def skip(self, positions) -> None:
        self.skipped.update(positions)

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` positions, without a Python loop over the rows."""
        if n == 0:
            return np.empty(0, np.int64)
        ahead = [p for p in self.skipped if p >= self.next]
        span = np.arange(self.next, self.next + n + len(ahead), dtype=np.int64)
        out = span[~np.isin(span, ahead)][:n]
        self.next = int(out[-1]) + 1
        self.skipped = {p for p in ahead if p >= self.next}
        return out


class JSONLRows(_RowSource):
    """One JSON object a line, parsed per line so that a bad line is one bad row.

    pandas' reader (what ``read_json(lines=True)`` uses) would coerce "007" to 7 and
    fail a whole file on one bad line; here a line that is not a JSON object, or not
    UTF-8, becomes a row with an ``error`` and the file goes on.
    """

    _FILE_EXTENSIONS = ["jsonl", "ndjson", "json"]

    def _tables(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        rows: list[dict] = []
        start = 0
        try:
            for line in _lines(f):
                if line.strip():
                    rows.append(_parse_line(line, self._encoding))
                if len(rows) == JSONL_CHUNK_ROWS:
                    yield _positioned(self._rows_table(rows), start)
                    start += len(rows)
                    rows = []
        except READ_ERRORS:
            # A file cut short (a truncated .gz): the lines read before it are rows.
            if rows:
                yield _positioned(self._rows_table(rows), start)
            raise
        if rows:
            yield _positioned(self._rows_table(rows), start)

    def _rows_table(self, rows: list[dict]) -> pa.Table:
        c = self._columns
        columns, bad = {}, [r.get("__bad__") for r in rows]
        for name in c.texts:
            values = [r.get(name) for r in rows]
            columns[name] = pa.array(
                [v if isinstance(v, str) else None for v in values], pa.string()
            )
            bad = [
                b or _not_string(r, name, c.text)
                for b, r in zip(bad, rows, strict=True)
            ]
        if c.id:
            columns[c.id] = pa.array(
                [None if r.get(c.id) is None else str(r[c.id]) for r in rows],
                pa.string(),
            )
        for name, kind in c.keep.items():
            if name not in columns:
                cells, errors = conform([r.get(name) for r in rows], kind, name)
                columns[name] = cells
                bad = [b or e for b, e in zip(bad, errors.to_pylist(), strict=True)]
        table = pa.table(columns)
        return table.append_column("_bad", pa.array(bad, pa.string()))


def _batch_tables(
    batches: Iterable[pa.RecordBatch], schema: pa.Schema, columns: Columns
) -> Iterator[pa.Table]:
    """A columnar file's batches as tables with their rows' positions. Text and ids
    stored as bytes (Parquet without its UTF-8 annotation, as older Hive and Impala
    writers leave it; Spark's binaryAsString) are decoded as CSV's are."""
    raw = [
        n
        for n in (*columns.texts, columns.id)
        if n in schema.names and _is_bytes(schema.field(n).type)
    ]
    start = 0
    for batch in batches:
        table = _positioned(pa.Table.from_batches([batch]), start)
        yield _decoded(table, raw) if raw else table
        start += batch.num_rows


def _is_bytes(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _decoded(table: pa.Table, columns: list[str]) -> pa.Table:
    """``columns`` of UTF-8 bytes as strings, and ``_bad`` naming each row whose bytes
    are not UTF-8."""
    bad: list[str | None] = [None] * table.num_rows
    for name in columns:
        if name in table.column_names:
            i = table.column_names.index(name)
            table = table.set_column(i, name, _decode(table[name], name, bad))
    return table.append_column("_bad", pa.array(bad, pa.string()))


def _decode(column: pa.ChunkedArray, name: str, bad: list[str | None]) -> pa.Array:
    """UTF-8 bytes to strings; a value that is not UTF-8 becomes null and its row's
    entry in ``bad`` says so."""
    try:
        return pc.cast(column, pa.string())
    except pa.ArrowInvalid:
        values = []
        for row, value in enumerate(column.to_pylist()):
            try:
                values.append(None if value is None else value.decode("utf-8"))
            except UnicodeDecodeError:
                values.append(None)
                bad[row] = bad[row] or f"bad_utf8: {name} is not valid UTF-8"
        return pa.array(values, pa.string())


def _lines(f: pa.NativeFile, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The file's lines, without a leading byte-order mark (Windows tools write one;
    JSON does not allow it, and pyarrow's CSV reader drops it too)."""
    rest = f.read(len(UTF8_BOM))
    if rest == UTF8_BOM:
        rest = b""
    while data := f.read(chunk):
        lines = (rest + data).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _parse_line(line: bytes, encoding: str = UTF8) -> dict:
    text = decode_line(line, encoding)
    if text is None and encoding == UTF8:
        return {"__bad__": "bad_utf8: line is not valid UTF-8"}
    if text is None:
        return {"__bad__": f"bad_encoding: line is not valid {encoding} text"}
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return {"__bad__": f"bad_json: {e.msg}"}
    return (
        row
        if isinstance(row, dict)
        else {"__bad__": f"bad_json: the line is {json_kind(row)}, not an object"}
    )


def _not_string(row: dict, name: str, text_column: str) -> str | None:
    """A line's text that is no string, or no text at all, named in JSON's words."""
    if name not in row:
        return f"null_text: the line has no {name!r} key"
    what = "text" if name == text_column else repr(name)
    value = row.get(name)
    if value is None or isinstance(value, str):
        return None  # null and empty are named by check_text, as for every format
    return f"not_string: {what} is {json_kind(value)}"


class TSVRows(CSVRows):
    """Tab-separated values, read as CSV is (quoting included, as pandas and
    Python's ``excel-tab`` read them)."""

    _FILE_EXTENSIONS = ["tsv"]
    FORMAT = "tsv"


SOURCES: dict[str, type[_RowSource]] = {
    "parquet": ParquetRows,
    "csv": CSVRows,
    "tsv": TSVRows,
    "jsonl": JSONLRows,
    "arrow": ArrowRows,
}


def read_rows(inputs: ResolvedInputs, columns: Columns) -> ray.data.Dataset:
    """A streamed dataset of ``id``, ``_text``, ``_error`` and kept columns."""
    source = SOURCES[inputs.format](
        inputs.paths,
        columns,
        inputs.encoding,
        filesystem=inputs.filesystem,
        file_extensions=None,
    )
    return ray.data.read_datasource(source)
