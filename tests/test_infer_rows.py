"""Formats, ids, bad rows: every row in is a row out, with an error if it failed."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import run_job

from lmbatch.errors import UserError
from lmbatch.jobs.run import run_job as launch
from lmbatch.jobs.spec import InferSpec

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_each_format_gives_the_parquet_jobs_embeddings_and_empty_shards_no_rows(
    fmt, tiny_models, corpus, embedded_corpus, tmp_path
):
    """The corpus's rows as JSONL or CSV give what its Parquet gave (the session's
    reference job). They sit beside an empty shard, as Spark and Dask write a file
    per partition, zero bytes where it had no rows; the empty one sorts first, where
    the driver reads the columns."""
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / f"part-0.{fmt}").write_bytes(b"")
    (shards / f"part-1.{fmt}").write_bytes(open(corpus[fmt], "rb").read())
    rows, summary = run_job(
        tmp_path / fmt,
        model=tiny_models["bert"],
        inputs=str(shards),
        task="embed",
        id_column="doc",
    )
    reference, _ = embedded_corpus
    assert summary.rows == 120 and summary.errors == {}
    assert rows.keys() == reference.keys()
    assert rows["doc-042"]["embedding"] == pytest.approx(
        reference["doc-042"]["embedding"], abs=1e-6
    )


@pytest.mark.parametrize("fmt,codec", [("jsonl", "gz"), ("csv", "zst")])
def test_compressed_inputs_read_as_their_format(
    fmt, codec, tiny_models, corpus, embedded_corpus, tmp_path
):
    packed = tmp_path / f"rows.{fmt}.{codec}"
    with open(corpus[fmt], "rb") as plain, pa.output_stream(str(packed)) as f:
        f.write(plain.read())  # the codec named by the suffix
    rows, _ = run_job(
        tmp_path / "out", model=tiny_models["bert"], inputs=str(packed), task="embed",
        keep_columns=("doc",),
    )  # fmt: skip
    reference, _ = embedded_corpus
    assert set(rows) == {f"{packed}#{i}" for i in range(120)}
    assert rows[f"{packed}#42"]["doc"] == "doc-042"
    assert rows[f"{packed}#42"]["embedding"] == pytest.approx(
        reference["doc-042"]["embedding"], abs=1e-6
    )


def test_arrow_inputs_hugging_face_folders_feather_and_a_cut_stream(
    tiny_models, corpus, embedded_corpus, tmp_path
):
    """A DatasetDict saved by Hugging Face datasets (its shards, not its JSON
    metadata), a Feather file and an Arrow stream cut short, in one job."""
    import datasets
    import pyarrow.feather as feather

    table = pq.read_table(corpus["parquet"])
    data = datasets.Dataset(table)
    split = datasets.DatasetDict(
        train=data.select(range(80)), test=data.select(range(80, 120))
    )
    split.save_to_disk(str(tmp_path / "hf"), num_shards={"train": 2, "test": 1})
    feather.write_feather(table, tmp_path / "rows.feather", chunksize=50)
    cut = tmp_path / "cut.arrow"
    with pa.ipc.new_stream(str(cut), table.schema) as w:
        w.write_table(table, max_chunksize=10)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size * 2 // 3])
    inputs = (str(tmp_path / "hf"), str(tmp_path / "rows.feather"), str(cut))
    rows, summary = run_job(
        tmp_path / "out", model=tiny_models["bert"], inputs=inputs, task="embed",
        keep_columns=("doc",),
    )  # fmt: skip
    reference, _ = embedded_corpus
    by_file: dict[str, list[dict]] = {}
    for row_id, row in rows.items():
        by_file.setdefault(row_id.rsplit("#", 1)[0], []).append(row)
    hf = [r for f, got in by_file.items() if "/hf/" in f for r in got]
    assert sorted(r["doc"] for r in hf) == sorted(reference)  # every row, once
    assert len(by_file[str(tmp_path / "rows.feather")]) == 120
    bad = [r for r in by_file[str(cut)] if r["error"]]
    assert summary.errors == {"bad_file": 1} and len(bad) == 1
    assert 0 < len(by_file[str(cut)]) - 1 < 120  # the rows before the cut, kept
    for row in rows.values():
        if row["doc"] == "doc-042":
            assert row["embedding"] == pytest.approx(
                reference["doc-042"]["embedding"], abs=1e-6
            )


@pytest.mark.fault("a truncated .jsonl.gz: the rows before the cut, then one row")
def test_a_truncated_gzip_file_keeps_its_rows_and_says_where_it_broke(
    tiny_models, tmp_path, fault_report
):
    lines = "".join(json.dumps({"text": f"line {i} " * 40}) + "\n" for i in range(4000))
    whole = gzip.compress(lines.encode(), mtime=0)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) * 3 // 4])
    rows, summary = run_job(
        tmp_path / "out", model=tiny_models["bert"], inputs=str(path), task="embed"
    )
    bad = [r for r in rows.values() if r["error"]]
    assert summary.errors == {"bad_file": 1} and len(bad) == 1
    cut_at = int(bad[0]["id"].rsplit("#", 1)[1])
    assert 0 < cut_at < 4000 and bad[0]["error"].startswith(f"bad_file: {path}")
    assert set(rows) == {f"{path}#{i}" for i in range(cut_at + 1)}
    fault_report(cut_at + 1, list(rows), sum(a["rows_started"] for a in summary.actors))


def test_a_byte_order_mark_is_not_part_of_the_first_row(tiny_models, tmp_path):
    """Windows tools start UTF-8 text with a BOM, which JSON does not allow."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "first row"}\n{"text": "second"}\n')
    rows, summary = run_job(
        tmp_path / "out", model=tiny_models["bert"], inputs=str(path), task="embed"
    )
    assert summary.rows == 2 and summary.errors == {}, rows


WINDOWS_TEXTS = ["café au lait", "naïve résumé", "“quoted” – dashed"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_file_in_another_encoding_reads_with_input_encoding(
    fmt, tiny_models, tmp_path
):
    """A spreadsheet's cp1252 export: every text as it was written, and a malformed
    line (one that is not UTF-8 either) one error row, not a failed file."""
    path = tmp_path / f"export.{fmt}"
    if fmt == "csv":
        lines = ["text,doc", *(f"{t},d{i}" for i, t in enumerate(WINDOWS_TEXTS)),
                 "trop de champs: é,d9,extra"]  # fmt: skip
    else:
        lines = [json.dumps({"text": t, "doc": f"d{i}"}, ensure_ascii=False)
                 for i, t in enumerate(WINDOWS_TEXTS)]  # fmt: skip
    undefined = b'{"text": "\x81", "doc": "d9"}\n'  # no character in cp1252
    path.write_bytes(
        "\n".join(lines).encode("cp1252")
        + b"\n"
        + (undefined if fmt == "jsonl" else b"")
    )
    flags = dict(model=tiny_models["bert"], inputs=str(path), task="embed",
                 id_column="doc", keep_columns=("text",))  # fmt: skip
    rows, summary = run_job(tmp_path / "out", input_encoding="cp1252", **flags)
    assert [rows[f"d{i}"]["text"] for i in range(3)] == WINDOWS_TEXTS
    dry = InferSpec.from_flags(
        output=str(tmp_path / "dry"), input_encoding="cp1252", dry_run=True,
        **{**flags, "inputs": (str(path),)},
    )  # fmt: skip
    said = launch("infer", dry, None)
    assert any(x.startswith(f"inputs 1 {fmt} files in cp1252, ") for x in said), said
    assert all(rows[f"d{i}"]["error"] is None for i in range(3))
    bad = {"csv": "a malformed line that is not UTF-8 text", "jsonl": "not utf-8 text"}
    assert (
        rows[f"{path}#3"]["error"]
        == {
            "csv": "bad_csv: line has 3 fields, expected 2",
            "jsonl": "bad_encoding: line is not valid cp1252 text",
        }[fmt]
    )
    assert summary.errors == {"csv": {"bad_csv": 1}, "jsonl": {"bad_encoding": 1}}[fmt]
    with pytest.raises(UserError) as e:  # read as UTF-8: refused before Ray starts
        run_job(tmp_path / "utf8", **flags)
    assert str(e.value).endswith(
        f"({bad[fmt]}: name the file's encoding with --input-encoding, e.g. "
        "cp1252, or convert it to UTF-8)"
    )


def test_inputs_of_no_rows_give_an_output_of_none(tiny_models, tmp_path):
    """Parquet files with a schema and no row (a filter that kept nothing): the job
    ends with its summary, 0 rows of 0, and no data file."""
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    out = tmp_path / "out"
    rows, summary = run_job(out, model=tiny_models["bert"], inputs=str(empty),
                            task="embed")  # fmt: skip
    assert rows == {} and summary.rows == 0 and summary.errors == {}
    assert "rows 0 of 0 input rows" in "\n".join(summary.lines())
    assert sorted(p.name for p in out.iterdir()) == [
        "_checkpoint", "_job.json", "_summary.json"
    ]  # fmt: skip


def test_parquet_text_stored_as_bytes_is_decoded(
    tiny_models, corpus, embedded_corpus, tmp_path
):
    """Older Hive and Impala writers store strings as bytes without the UTF-8
    annotation; a value that is not UTF-8 is that row's error."""
    table = pq.read_table(corpus["parquet"])
    as_bytes = [t.encode() for t in table["text"].to_pylist()]
    as_bytes[7] = b"caf\xe9"  # Latin-1, not UTF-8
    raw = pa.table({
        "doc": pa.array([d.encode() for d in table["doc"].to_pylist()], pa.binary()),
        "text": pa.array(as_bytes, pa.binary()),
    })  # fmt: skip
    path = tmp_path / "raw.parquet"
    pq.write_table(raw, path)
    rows, summary = run_job(
        tmp_path / "out", model=tiny_models["bert"], inputs=str(path), task="embed",
        id_column="doc",
    )  # fmt: skip
    reference, _ = embedded_corpus
    assert summary.rows == 120 and summary.errors == {"bad_utf8": 1}
    assert rows["doc-007"]["error"] == "bad_utf8: text is not valid UTF-8"
    assert rows["doc-042"]["embedding"] == pytest.approx(
        reference["doc-042"]["embedding"], abs=1e-6
    )


def test_ids_derive_from_file_and_row_and_are_stable(
    tiny_models, corpus, embedded_corpus, tmp_path
):
    first, _ = run_job(
        tmp_path / "a",
        model=tiny_models["bert"],
        inputs=corpus["parquet"],
        task="embed",
    )
    again, _ = run_job(
        tmp_path / "b",
        model=tiny_models["bert"],
        inputs=corpus["parquet"],
        task="embed",
    )
    assert set(first) == {f"{corpus['parquet']}#{i}" for i in range(120)}
    assert first.keys() == again.keys()
    # Row 100 sits in the third row group: offsets run across groups, not within them.
    with_ids, _ = embedded_corpus
    assert (
        first[f"{corpus['parquet']}#100"]["embedding"]
        == with_ids["doc-100"]["embedding"]
    )


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_row_without_an_id_is_an_error_under_its_file_and_row(
    fmt, tiny_models, tmp_path
):
    """An --id-column value that is null, absent or empty (CSV's missing cell) is no
    key: two such rows would share one id, and --resume would skip the second. Each
    is an error row under its ``file#row`` id; the others keep theirs."""
    if fmt == "jsonl":
        path = tmp_path / "rows.jsonl"
        given = [{"doc": "d0"}, {"doc": None}, {}, {"doc": ""}, {"doc": ""}]
        path.write_text(
            "".join(
                json.dumps({**row, "text": f"the word {i}"}) + "\n"
                for i, row in enumerate(given)
            )
        )
    else:
        path = tmp_path / "rows.csv"
        path.write_text("doc,text\nd0,the word 0\n,the word 1\n,the word 2\n")
    rows, _ = run_job(
        tmp_path / "out", model=tiny_models["bert"], inputs=str(path), task="embed",
        id_column="doc",
    )  # fmt: skip
    missing = {f"{path}#{i}" for i in range(1, 5 if fmt == "jsonl" else 3)}
    assert set(rows) == {"d0"} | missing
    assert rows["d0"]["error"] is None and rows["d0"]["embedding"] is not None
    for id_ in missing:
        assert rows[id_]["error"] == (
            "null_id: 'doc' is null or empty; the row's id is file#row"
        )


def test_directories_globs_and_several_inputs(tiny_models, corpus, tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    table = pq.read_table(corpus["parquet"])
    for i in range(3):
        pq.write_table(table.slice(i * 40, 40), parts / f"part-{i}.parquet")
    (parts / "_SUCCESS").write_text("")
    by_dir, _ = run_job(
        tmp_path / "d", model=tiny_models["bert"], inputs=str(parts), task="embed"
    )
    by_glob, _ = run_job(
        tmp_path / "g",
        model=tiny_models["bert"],
        inputs=f"{parts}/part-[01].parquet",
        task="embed",
    )
    listed, _ = run_job(
        tmp_path / "l",
        model=tiny_models["bert"],
        task="embed",
        id_column="doc",
        inputs=(str(parts / "part-0.parquet"), str(parts / "part-2.parquet")),
    )
    assert len(by_dir) == 120 and len(by_glob) == 80 and len(listed) == 80
    assert f"{parts}/part-2.parquet#39" in by_dir and "doc-119" in listed


def test_an_output_inside_the_input_directory_is_not_read_back(
    tiny_models, corpus, tmp_path
):
    """--input data/ --output data/embeddings/: the second run reads the data only,
    and its --overwrite deletes no input."""
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pq.read_table(corpus["parquet"]), data / "rows.parquet")
    flags = dict(model=tiny_models["bert"], inputs=str(data), task="embed")
    first, _ = run_job(data / "embeddings", **flags)
    again, summary = run_job(data / "embeddings", overwrite=True, **flags)
    assert summary.rows == 120 and summary.errors == {}
    assert set(again) == set(first) == {f"{data}/rows.parquet#{i}" for i in range(120)}


@pytest.mark.fault(
    "bad rows in JSONL: null, empty, not text, bad JSON, bad UTF-8, long"
)
def test_bad_rows_get_errors_and_the_job_goes_on(tiny_models, tmp_path, fault_report):
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"text": "the water is long", "k": 0}),
        json.dumps({"text": None, "k": 1}),
        json.dumps({"text": "   ", "k": 2}),
        json.dumps({"text": 42, "k": 3}),
        json.dumps({"k": 4}),
        "{not json",
        json.dumps({"text": " ".join(["water"] * 40), "k": 6}),
        json.dumps({"text": "call who oil", "k": 7}),
    ]
    path.write_bytes(
        ("\n".join(lines) + "\n").encode() + b'{"text": "\xff\xfe", "k": 8}\n'
    )
    rows, summary = run_job(
        tmp_path / "out",
        model=tiny_models["gpt2"],
        inputs=str(path),
        task="score",
        max_length=16,
        on_long="error",
    )
    errors = {int(i.rsplit("#", 1)[1]): r["error"] for i, r in rows.items()}
    kinds = {i: (e or "").split(":")[0] for i, e in errors.items()}
    assert kinds == {
        0: "",
        1: "null_text",
        2: "empty_text",
        3: "not_string",
        4: "null_text",
        5: "bad_json",
        6: "too_long",
        7: "",
        8: "bad_utf8",
    }
    assert errors[3] == "not_string: text is a number"  # JSON's words, not Python's
    assert errors[4] == "null_text: the line has no 'text' key"
    assert summary.rows == 9
    assert summary.errors == {
        "null_text": 2,
        "empty_text": 1,
        "not_string": 1,
        "bad_json": 1,
        "too_long": 1,
        "bad_utf8": 1,
    }
    assert rows[f"{path}#0"]["logprob"] < 0 and rows[f"{path}#1"]["logprob"] is None
    ids = pq.read_table(tmp_path / "out", columns=["id"])["id"].to_pylist()
    fault_report(9, ids, sum(a["rows_started"] for a in summary.actors))


def test_long_rows_are_truncated_by_default(tiny_models, tmp_path):
    path = tmp_path / "long.parquet"
    pq.write_table(pa.table({"text": [" ".join(["water"] * 200), "the day"]}), path)
    rows, summary = run_job(
        tmp_path / "out", model=tiny_models["gpt2"], inputs=str(path), task="score"
    )
    assert summary.errors == {}
    assert (
        rows[f"{path}#0"]["num_tokens"] == 63
    )  # 64 positions, the first is not predicted


def test_score_refuses_one_token_rows(tiny_models, tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("text\nwater\nthe water\n")
    rows, _ = run_job(
        tmp_path / "out", model=tiny_models["gpt2"], inputs=str(path), task="score"
    )
    assert rows[f"{path}#0"]["error"] == "too_short: 1 token, this task needs 2"
    assert rows[f"{path}#1"]["error"] is None


def test_overwrite_replaces_output(tiny_models, corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "_job.json").write_text("{}")  # an earlier job's output
    (out / "old.parquet").write_bytes(b"stale")
    rows, _ = run_job(
        out,
        model=tiny_models["bert"],
        inputs=corpus["csv"],
        task="embed",
        overwrite=True,
    )
    assert len(rows) == 120 and not (out / "old.parquet").exists()
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows"] == 120 and summary["actors"][0]["rows"] == 120


def test_a_later_file_without_the_column_gives_error_rows(tiny_models, tmp_path):
    """Only the first file is checked up front; the reader names any later bad file."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text("text\nthe water\n")
    (tmp_path / "in" / "b.csv").write_text("body\nthe day\nwho\n")
    rows, summary = run_job(
        tmp_path / "out",
        model=tiny_models["bert"],
        inputs=str(tmp_path / "in"),
        task="embed",
    )
    b = tmp_path / "in" / "b.csv"
    assert summary.rows == 3 and summary.errors == {"missing_column": 2}
    assert rows[f"{b}#1"]["error"] == f"missing_column: {b} has no column 'text'"
    assert rows[f"{tmp_path / 'in' / 'a.csv'}#0"]["embedding"] is not None


@pytest.mark.fault("invalid UTF-8 in a CSV row")
def test_invalid_utf8_in_csv_is_one_bad_row(tiny_models, tmp_path, fault_report):
    path = tmp_path / "mixed.csv"
    path.write_bytes(b"id,text\na,the water\nb,oil \xff\xfe here\nc,call who\n")
    rows, summary = run_job(
        tmp_path / "out", model=tiny_models["bert"], inputs=str(path), task="embed",
        id_column="id",
    )  # fmt: skip
    assert rows["b"]["error"] == "bad_utf8: text is not valid UTF-8"
    assert rows["a"]["error"] is None and rows["c"]["error"] is None
    assert summary.rows == 3 and summary.errors == {"bad_utf8": 1}
    fault_report(
        3,
        pq.read_table(tmp_path / "out", columns=["id"])["id"].to_pylist(),
        sum(a["rows_started"] for a in summary.actors),
    )


@pytest.mark.fault("a 10 MB text among short ones")
def test_a_ten_megabyte_text_is_truncated_not_a_crash(
    tiny_models, tmp_path, fault_report
):
    huge = " ".join(["water"] * (10_000_000 // 6))
    path = tmp_path / "huge.parquet"
    pq.write_table(pa.table({"text": ["the day", huge, "one way"]}), path)
    rows, summary = run_job(
        tmp_path / "out", model=tiny_models["gpt2"], inputs=str(path), task="score"
    )
    assert summary.rows == 3 and summary.errors == {}
    assert rows[f"{path}#1"]["num_tokens"] == 63
    # The row says it was cut; the job says how many, and how to refuse it.
    assert [rows[f"{path}#{i}"]["truncated"] for i in range(3)] == [False, True, False]
    assert summary.truncated == 1
    assert (
        "truncated 1 row (33.3% of 3) to --max-length 64 tokens; "
        "--on-long chunk reads each whole, --on-long error makes each an error instead"
    ) in summary.lines()
    summary.can_chunk = False  # classify, generate: no chunk to offer
    assert (
        "truncated 1 row (33.3% of 3) to --max-length 64 tokens; "
        "--on-long error makes each an error instead"
    ) in summary.lines()
    fault_report(
        3,
        pq.read_table(tmp_path / "out", columns=["id"])["id"].to_pylist(),
        sum(a["rows_started"] for a in summary.actors),
    )
    errors, refused = run_job(
        tmp_path / "err", model=tiny_models["gpt2"], inputs=str(path), task="score",
        on_long="error",
    )  # fmt: skip
    assert errors[f"{path}#1"]["error"].startswith("too_long")
    assert "truncated" not in errors[f"{path}#0"]  # nothing is cut: no such column
    assert refused.truncated == 0
    assert not any("truncated" in line for line in refused.lines())


@pytest.mark.fault("a corrupt Parquet file among good ones (counted as one row)")
def test_a_corrupt_parquet_file_among_good_ones_is_one_error_row(
    tiny_models, corpus, tmp_path, fault_report
):
    folder = tmp_path / "in"
    folder.mkdir()
    good = pq.read_table(corpus["parquet"])
    pq.write_table(good.slice(0, 60), folder / "a.parquet")
    (folder / "b.parquet").write_bytes(b"PAR1 this is not a parquet file at all")
    pq.write_table(good.slice(60, 60), folder / "c.parquet")
    rows, summary = run_job(
        tmp_path / "out", model=tiny_models["bert"], inputs=str(folder), task="embed",
        id_column="doc",
    )  # fmt: skip
    assert summary.rows == 121 and summary.errors == {"bad_file": 1}
    bad = rows[f"{folder / 'b.parquet'}#0"]
    assert bad["error"].startswith(f"bad_file: {folder / 'b.parquet'} unreadable")
    assert {f"doc-{i:03d}" for i in range(120)} <= rows.keys()
    ids = pq.read_table(tmp_path / "out", columns=["id"])["id"].to_pylist()
    fault_report(121, ids, sum(a["rows_started"] for a in summary.actors))
