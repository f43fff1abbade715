"""The text encoding of CSV, TSV and JSONL inputs (``--input-encoding``).

UTF-8 unless the user names another: a spreadsheet's export on Windows is often
cp1252. pyarrow transcodes a CSV file to UTF-8 as it reads it; a JSONL line is
decoded in the reader. Parquet and Arrow hold UTF-8 text by their formats.
"""

from __future__ import annotations

import codecs
import contextlib
import sys
from collections.abc import Iterator

import pyarrow.csv as pacsv

UTF8 = "utf-8"
UTF8_BOM = b"\xef\xbb\xbf"  # Windows tools start UTF-8 text with it; JSON may not
# Bytes of CSV pyarrow parses at a time, so the longest row it reads (the cost: a
# block in memory per read task, not the blocks the job's stages pass on).
CSV_BLOCK = 16 << 20


def check_encoding(name: str) -> str:
    """Python's name for the codec ``name``; one whose lines do not end in a b"\\n"
    byte (UTF-16, UTF-32) is refused: lines are split as bytes before decoding.

    Raises:
        ValueError: for an unknown or not ASCII-compatible codec (pydantic names
            the flag).
    """
    try:
        codec = codecs.lookup(name)
        newline = "a\n".encode(codec.name)
    except LookupError as e:  # unknown, or a bytes codec (base64, zlib, rot13)
        known = "not a text encoding" in str(e)
        raise ValueError(
            f"{name!r} is not a text encoding"
            if known
            else f"unknown encoding {name!r}"
        ) from None
    if newline != b"a\n":
        raise ValueError(
            f"{codec.name} is not ASCII-compatible; convert the files to UTF-8"
        )
    return codec.name


def csv_read_options(encoding: str, **options) -> pacsv.ReadOptions:
    """pyarrow's read options, transcoding from ``encoding`` unless it is UTF-8
    (pyarrow's own name for which is utf8: any other name costs a transcoding
    pass through Python's codec). A row must fit in one of pyarrow's blocks: its
    default 1 MiB failed the rest of a file at a long document."""
    return pacsv.ReadOptions(
        encoding="utf8" if encoding == UTF8 else encoding,
        block_size=CSV_BLOCK,
        **options,
    )


def decode_line(line: bytes, encoding: str) -> str | None:
    """A JSONL line's text; None where it is not text in ``encoding``."""
    try:
        return line.decode(encoding)
    except UnicodeDecodeError:
        return None


def read_error(e: Exception) -> str:
    """Why a file could not be read, in one line. A CSV line that has the wrong
    number of fields and is not UTF-8 text fails the whole read: pyarrow cannot
    hand it to the reader, which would make it a row's error."""
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, UnicodeDecodeError):
        what = f"not {e.encoding} text"
    elif "CSV parse error" in reason and "\ufffd" in reason:
        what = "a malformed line that is not UTF-8 text"
    elif "straddling object" in reason:  # pyarrow's hint (a bigger block) is not ours
        return (
            f"a CSV row longer than {CSV_BLOCK >> 20} MiB, or a quote never closed "
            "(put texts that long in JSONL or Parquet)"
        )
    else:
        return reason
    return (
        f"{reason} ({what}: name the file's encoding with --input-encoding, "
        "e.g. cp1252, or convert it to UTF-8)"
    )


@contextlib.contextmanager
def quiet_undecodable_rows() -> Iterator[None]:
    """pyarrow decodes a malformed CSV line before handing it to
    ``invalid_row_handler``; where it is not UTF-8, it prints the decode error as an
    unraisable exception (a traceback on the console) and fails the read, whose
    error ``read_error`` reports instead."""
    hook = sys.unraisablehook

    def quiet(unraisable) -> None:
        if not isinstance(unraisable.exc_value, UnicodeDecodeError):
            hook(unraisable)

    sys.unraisablehook = quiet
    try:
        yield
    finally:
        sys.unraisablehook = hook
