"""One check of every input text, for every format: null, empty or not a string
becomes the row's ``error``, never a crashed read. Arrow compute only (the readers
run it on every block, and the driver imports it without torch).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc


def is_text(kind: pa.DataType) -> bool:
    """Text in any of Arrow's layouts: large strings (polars writes them), string
    views, and dictionary-encoded strings (a pandas categorical, as Parquet keeps
    it)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_string_view(kind)
    )


def may_hold_text(kind: pa.DataType) -> bool:
    """Whether a typed column (Parquet's, Arrow's) can hold text: text, bytes (decoded
    as UTF-8 by the readers) or nulls alone. Any other type makes every row an error:
    a wrong --text-column, refused before the job."""
    return (
        is_text(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or pa.types.is_null(kind)
    )


def check_text(
    column: pa.ChunkedArray, what: str = "text"
) -> tuple[pa.Array, pa.Array]:
    """-> (text or null, error or null); the error names what is wrong with the row,
    and ``what`` text it is (a pair's second text is named by its column)."""
    if not is_text(column.type):
        if pa.types.is_null(column.type):
            kind = pa.array([f"null_text: {what} is null"] * len(column), pa.string())
        else:
            kind = pa.array(
                [f"not_string: {what} is {column.type}"] * len(column), pa.string()
            )
        return pa.nulls(len(column), pa.string()), kind
    text = pc.cast(column, pa.string())
    error = pc.if_else(
        pc.is_null(text),
        f"null_text: {what} is null",
        pc.if_else(
            pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0),
            f"empty_text: {what} is empty",
            pa.scalar(None, pa.string()),
        ),
    )
    return text.combine_chunks(), error.combine_chunks()


def json_kind(value: object) -> str:
    """A JSON value's type in JSON's words (a request's, a JSONL line's): a user
    need not know Python's."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    names = {str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)
