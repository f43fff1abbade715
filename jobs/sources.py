"""Ray Data readers that give every row a stable id and a checked text.

Ray's file-based datasource does discovery, filesystems, retries and parallel read
tasks; we override only ``_read_stream`` (its extension point) to add what Ray's own
readers lack for every format: the row's position in its file, so that the id
``<path>#<row>`` is stable across re-runs, and one normalisation of the text column:
null, empty or non-string text becomes an ``error`` value, never a crashed read.

Every block leaves here with three columns: ``id``, ``_text``, ``_error``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray.data
from ray.data.datasource import FileBasedDatasource

from lmbatch.actors.text import check_text
from lmbatch.jobs.inputs import ResolvedInputs

ROW_SCHEMA = pa.schema(
    [("id", pa.string()), ("_text", pa.string()), ("_error", pa.string())]
)
JSONL_CHUNK_ROWS = 4096


class _RowSource(FileBasedDatasource):
    """Base: subclasses yield raw Arrow tables; this adds ids and checks text."""

    def __init__(self, paths: list[str], text_column: str, id_column: str | None, **kw):
        super().__init__(paths, **kw)
        self._text_column, self._id_column = text_column, id_column

    def _tables(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        raise NotImplementedError

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        offset = 0
        try:
            for table in self._tables(f, path):
                yield self._checked(table, path, offset)
                offset += table.num_rows
        except (pa.ArrowException, OSError, ValueError) as e:
            # A corrupt or truncated file: one row says where reading stopped and why;
            # the job and the other files go on.
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            error = f"bad_file: {path} unreadable from row {offset}: {reason}"
            yield pa.table(
                [[f"{path}#{offset}"], pa.nulls(1, pa.string()), [error]],
                schema=ROW_SCHEMA,
            )

    def _checked(self, table: pa.Table, path: str, offset: int) -> pa.Table:
        # Only the first file is checked before the job; a later file without the
        # column gives rows with an error naming it, never a crashed job.
        wanted = (self._text_column, self._id_column)
        missing = [c for c in wanted if c and c not in table.column_names]
        for column in missing:
            table = table.append_column(column, pa.nulls(table.num_rows, pa.string()))
        out = self._normalise(table, path, offset)
        if missing:
            error = f"missing_column: {path} has no column {missing[0]!r}"
            out = out.set_column(2, "_error", pa.array([error] * len(out), pa.string()))
        return out

    def _normalise(self, table: pa.Table, path: str, offset: int) -> pa.Table:
        """ids, text and errors; a ``_bad`` column (what a reader found wrong with a
        row, e.g. bad UTF-8) comes before the text checks."""
        bad = table["_bad"] if "_bad" in table.column_names else None
        if bad is not None:
            table = table.drop_columns(["_bad"])
        n = table.num_rows
        derived = pa.array(
            [f"{path}#{i}" for i in range(offset, offset + n)], pa.string()
        )
        ids = derived
        if self._id_column is not None:
            given = pc.cast(table[self._id_column], pa.string())
            ids = pc.if_else(pc.is_null(given), derived, given)
        text, error = check_text(table[self._text_column])
        if self._id_column is not None:
            missing = pc.is_null(table[self._id_column])
            error = pc.if_else(
                pc.and_(missing, pc.is_null(error)),
                "null_id: no id, used file#row",
                error,
            )
        if bad is not None:
            error = pc.coalesce(bad, error)
        return pa.table([ids, text, error], schema=ROW_SCHEMA)


class ParquetRows(_RowSource):
    _FILE_EXTENSIONS = ["parquet", "pq"]

    def _open_input_source(self, filesystem, path: str, **open_args) -> pa.NativeFile:
        return filesystem.open_input_file(
            path
        )  # Parquet reads its footer first: seekable

    def _tables(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        pfile = pq.ParquetFile(f)
        columns = [
            c
            for c in (self._text_column, self._id_column)
            if c in pfile.schema_arrow.names
        ]
        for batch in pfile.iter_batches(columns=columns or None):
            yield pa.Table.from_batches([batch])


class CSVRows(_RowSource):
    _FILE_EXTENSIONS = ["csv"]

    def _tables(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        # Text and id as bytes, decoded here: as strings "007" would become 7, "" a
        # null, and one invalid UTF-8 byte would fail the whole file.
        columns = [c for c in (self._text_column, self._id_column) if c]
        reader = pacsv.open_csv(
            f,
            read_options=pacsv.ReadOptions(use_threads=False),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(columns, pa.binary())
            ),
        )
        for batch in reader:
            table = pa.Table.from_batches([batch])
            bad: list[str | None] = [None] * table.num_rows
            for column in columns:
                if column in table.column_names:
                    i = table.column_names.index(column)
                    table = table.set_column(
                        i, column, _decode(table[column], column, bad)
                    )
            yield table.append_column("_bad", pa.array(bad, pa.string()))


class JSONLRows(_RowSource):
    """One JSON object a line, parsed per line so that a bad line is one bad row.

    pandas' reader (what ``read_json(lines=True)`` uses) would coerce "007" to 7 and
    fail a whole file on one bad line; here a line that is not a JSON object, or not
    UTF-8, becomes a row with an ``error`` and the file goes on.
    """

    _FILE_EXTENSIONS = ["jsonl", "ndjson", "json"]

    def _tables(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        rows: list[dict] = []
        for line in _lines(f):
            if line.strip():
                rows.append(_parse_line(line, self._text_column))
            if len(rows) == JSONL_CHUNK_ROWS:
                yield self._rows_table(rows)
                rows = []
        if rows:
            yield self._rows_table(rows)

    def _rows_table(self, rows: list[dict]) -> pa.Table:
        text = self._text_column
        values = [r.get(text) for r in rows]
        columns = {
            text: pa.array(
                [v if isinstance(v, str) else None for v in values], pa.string()
            )
        }
        if self._id_column:
            columns[self._id_column] = pa.array(
                [
                    None if r.get(self._id_column) is None else str(r[self._id_column])
                    for r in rows
                ],
                pa.string(),
            )
        table = pa.table(columns)
        table = table.append_column(
            "_bad",
            pa.array(
                [_bad_value(r, v) for r, v in zip(rows, values, strict=True)],
                pa.string(),
            ),
        )
        return table


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
    rest = b""
    while data := f.read(chunk):
        lines = (rest + data).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _parse_line(line: bytes, text_column: str) -> dict:
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return {"__bad__": "bad_utf8: line is not valid UTF-8"}
    except json.JSONDecodeError as e:
        return {"__bad__": f"bad_json: {e.msg}"}
    return (
        row if isinstance(row, dict) else {"__bad__": "bad_json: line is not an object"}
    )


def _bad_value(row: dict, value: object) -> str | None:
    if "__bad__" in row:
        return row["__bad__"]
    if value is None or isinstance(value, str):
        return None  # null and empty are named by _check_text, as for every format
    return f"not_string: text is {type(value).__name__}"


SOURCES: dict[str, type[_RowSource]] = {
    "parquet": ParquetRows,
    "csv": CSVRows,
    "jsonl": JSONLRows,
}


def read_rows(
    inputs: ResolvedInputs, text_column: str, id_column: str | None
) -> ray.data.Dataset:
    """A streamed dataset of ``id``, ``_text``, ``_error`` rows over all inputs."""
    source = SOURCES[inputs.format](
        inputs.paths,
        text_column=text_column,
        id_column=id_column,
        filesystem=inputs.filesystem,
        file_extensions=None,
    )
    return ray.data.read_datasource(source)
