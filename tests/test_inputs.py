"""Input resolution on the driver: formats, globs, directories, hidden files."""

from __future__ import annotations

import pytest

from lmbatch.errors import UserError
from lmbatch.jobs.inputs import resolve_inputs


def touch_csv(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("text,key\nhello,1\n")
    return str(path)


def test_directory_recurses_and_skips_hidden_and_underscore(tmp_path):
    touch_csv(tmp_path / "d" / "a.csv")
    touch_csv(tmp_path / "d" / "sub" / "b.csv")
    touch_csv(tmp_path / "d" / "_tmp.csv")
    touch_csv(tmp_path / "d" / ".hidden.csv")
    got = resolve_inputs([str(tmp_path / "d")], None, "text", "key")
    assert got.format == "csv"
    assert got.paths == [
        str(tmp_path / "d" / "a.csv"),
        str(tmp_path / "d" / "sub" / "b.csv"),
    ]


def test_glob_and_duplicates(tmp_path):
    a = touch_csv(tmp_path / "a.csv")
    touch_csv(tmp_path / "b.csv")
    got = resolve_inputs([str(tmp_path / "*.csv"), a], None, "text", None)
    assert got.paths == [a, str(tmp_path / "b.csv")]


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    touch_csv(tmp_path / "a.csv")
    monkeypatch.chdir(tmp_path)
    assert resolve_inputs(["a.csv"], None, "text", None).paths == [
        str(tmp_path / "a.csv")
    ]
    assert resolve_inputs(["*.csv"], None, "text", None).paths == [
        str(tmp_path / "a.csv")
    ]


def test_mixed_formats_refused(tmp_path):
    touch_csv(tmp_path / "a.csv")
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(UserError, match="mixed formats"):
        resolve_inputs(
            [str(tmp_path / "a.csv"), str(tmp_path / "b.jsonl")], None, "text", None
        )


def test_forced_format_reads_any_suffix(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text('{"text": "x", "n": 1}\n')
    got = resolve_inputs([str(path)], "jsonl", "text", "n")
    assert got.columns == ["text", "n"]


def test_filesystem_uris_resolve_like_paths(tmp_path):
    """Any pyarrow filesystem URI; file:// is the one reachable without a network."""
    touch_csv(tmp_path / "d" / "a.csv")
    got = resolve_inputs([f"file://{tmp_path}/d/*.csv"], None, "text", None)
    assert got.paths == [str(tmp_path / "d" / "a.csv")]
    directory = resolve_inputs([f"file://{tmp_path}/d"], None, "text", None)
    assert directory.paths == got.paths
