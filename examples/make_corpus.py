"""Build examples/corpus.parquet: real English text under the PSF licence.

Paragraphs of the documentation topics CPython ships in ``pydoc_data`` plus the
docstrings of a fixed list of standard-library modules. Run once; the Parquet file
is committed so that the demo and benchmarks need nothing else.

Usage: python examples/make_corpus.py [OUT]
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path
from pydoc_data.topics import topics

import pyarrow as pa
import pyarrow.parquet as pq

MODULES = [
    "argparse",
    "asyncio",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "email",
    "functools",
    "http.client",
    "inspect",
    "itertools",
    "json",
    "logging",
    "os",
    "pathlib",
    "pickle",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "string",
    "subprocess",
    "tarfile",
    "threading",
    "typing",
    "unittest",
    "urllib.parse",
    "zipfile",
]


def paragraphs(text: str, min_chars: int = 20) -> list[str]:
    """Split on blank lines, collapse whitespace, drop fragments too short to embed."""
    out = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return [p for p in out if len(p) >= min_chars]


def docstrings(module_name: str) -> list[tuple[str, str]]:
    module = importlib.import_module(module_name)
    rows = [(module_name, p) for p in paragraphs(inspect.getdoc(module) or "")]
    for name, member in sorted(vars(module).items()):
        if name.startswith("_") or getattr(member, "__module__", None) != module_name:
            continue
        rows += [
            (f"{module_name}.{name}", p)
            for p in paragraphs(inspect.getdoc(member) or "")
        ]
    return rows


def main(out: Path) -> None:
    rows = [(f"topic:{k}", p) for k, v in sorted(topics.items()) for p in paragraphs(v)]
    for name in MODULES:
        rows += docstrings(name)
    table = pa.table(
        {
            "doc_id": [f"d{i:05d}" for i in range(len(rows))],
            "source": [s for s, _ in rows],
            "text": [t for _, t in rows],
        }
    )
    pq.write_table(table, out)
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main(
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).with_name("corpus.parquet")
    )
