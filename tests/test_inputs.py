"""Input resolution on the driver: formats, globs, directories, hidden files."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmbatch.actors.text import check_text
from lmbatch.errors import UserError
from lmbatch.jobs.calibration import read_texts
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
    folder = tmp_path / "data"
    touch_csv(folder / "a.csv")
    (folder / "schema.json").write_text("{}\n")  # metadata beside the data
    with pytest.raises(UserError) as refused:
        resolve_inputs([str(folder)], None, "text", None)
    assert refused.value.message == (
        f"mixed formats: {folder / 'schema.json'} is not csv; give the files of "
        f"one, such as {folder}/*.csv"
    )


def test_compressed_jsonl_and_csv_are_found_by_their_inner_suffix(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("a.jsonl.gz", "b.jsonl.zst", "c.JSONL.BZ2", "d.jsonl"):
        with pa.output_stream(str(tmp_path / "d" / name)) as f:  # codec by suffix
            f.write(b'{"text": "x", "n": 1}\n')
    (tmp_path / "d" / "e.parquet.gz").write_bytes(b"")  # no such format
    got = resolve_inputs([str(tmp_path / "d")], None, "text", "n")
    assert got.format == "jsonl" and got.columns == ["text", "n"]
    assert [p.rsplit("/", 1)[1] for p in got.paths] == [
        "a.jsonl.gz",
        "b.jsonl.zst",
        "c.JSONL.BZ2",
        "d.jsonl",
    ]
    with pytest.raises(UserError, match="cannot tell the format .*e.parquet.gz"):
        resolve_inputs([str(tmp_path / "d" / "e.parquet.gz")], None, "text", None)


def test_a_missing_column_is_named_with_the_closest_ones(tmp_path):
    wide = pa.table({**{f"feature_{i}": [1] for i in range(40)}, "text": ["x"]})
    pq.write_table(wide, tmp_path / "wide.parquet")
    with pytest.raises(UserError) as e:
        resolve_inputs([str(tmp_path / "wide.parquet")], None, "txt", None)
    assert e.value.where == "--text-column" and e.value.message == (
        f"no column 'txt' in {tmp_path}/wide.parquet (has 41: 'feature_0', "
        "'feature_1', 'feature_2', 'feature_3', 'feature_4', ...); did you mean "
        "'text'?"
    )
    path = touch_csv(tmp_path / "narrow.csv")
    with pytest.raises(UserError, match=r"\(has \['text', 'key'\]\)$"):
        resolve_inputs([path], None, "body", None)


def test_files_inside_the_output_are_never_inputs(tmp_path):
    data = tmp_path / "data"
    touch_csv(data / "a.csv")
    for part in ("part-0.csv", "part-1.csv"):  # what a job writing data/out left
        touch_csv(data / "out" / part)
    out = str(data / "out")
    got = resolve_inputs([str(data)], None, "text", None, output=out)
    assert got.paths == [str(data / "a.csv")]
    glob = resolve_inputs([f"{data}/**/*.csv"], None, "text", None, output=out)
    assert glob.paths == got.paths
    with pytest.raises(UserError) as e:
        resolve_inputs([str(data / "a.csv")], None, "text", None, output=str(data))
    assert e.value.where == "--input" and e.value.message.startswith(
        f"{data}/a.csv is inside --output {data}: the job would read what it writes"
    )
    with pytest.raises(UserError, match=f"every file of {data}/out is inside"):
        resolve_inputs([str(data / "out")], None, "text", None, output=str(data))


def test_an_earlier_output_inside_an_input_directory_is_skipped(tmp_path, caplog):
    """Its rows would be read twice, under other ids; a glob that names it, or the
    output given alone, reads it."""
    data = tmp_path / "data"
    kept = touch_csv(data / "a.csv")
    earlier = data / "embeddings"
    touch_csv(earlier / "part-0.csv")
    (earlier / "_job.json").write_text("{}")
    got = resolve_inputs([str(data)], None, "text", None)
    assert got.paths == [kept]
    assert f"--input {data}: skipping {earlier}, an earlier lmbatch job's output" in (
        caplog.text
    )
    both = resolve_inputs([f"{data}/**/*.csv"], None, "text", None)
    assert both.paths == [kept, str(earlier / "part-0.csv")]
    alone = resolve_inputs([str(earlier)], None, "text", None)
    assert alone.paths == [str(earlier / "part-0.csv")]
    (data / "a.csv").unlink()
    with pytest.raises(UserError, match=f"{data} holds only lmbatch outputs"):
        resolve_inputs([str(data)], None, "text", None)
    touch_csv(data / "a.csv")
    caplog.clear()  # the job's own output: skipped as ever, and not said to be
    own = resolve_inputs([str(data)], None, "text", None, output=str(earlier))
    assert own.paths == [kept] and "skipping" not in caplog.text


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


def test_underscore_and_dot_folders_are_skipped_at_every_depth(tmp_path):
    """d/{a.csv, sub/b.csv, _checkpoint/c.csv, sub/.cache/e.csv}: only the data."""
    for name in ("a.csv", "sub/b.csv", "_checkpoint/c.csv", "sub/.cache/e.csv"):
        touch_csv(tmp_path / "d" / name)
    data = [str(tmp_path / "d" / "a.csv"), str(tmp_path / "d" / "sub" / "b.csv")]
    assert resolve_inputs([str(tmp_path / "d")], None, "text", None).paths == data
    both = resolve_inputs([str(tmp_path / "d" / "**" / "*.csv")], None, "text", None)
    assert both.paths == data


def test_a_star_stops_at_a_slash_and_two_cross_directories(tmp_path):
    for name in ("a.csv", "sub/b.csv", "sub/deeper/c.csv"):
        touch_csv(tmp_path / "d" / name)
    top = resolve_inputs([str(tmp_path / "d" / "*.csv")], None, "text", None)
    assert top.paths == [str(tmp_path / "d" / "a.csv")]
    one_down = resolve_inputs([str(tmp_path / "d" / "*" / "*.csv")], None, "text", None)
    assert one_down.paths == [str(tmp_path / "d" / "sub" / "b.csv")]
    every = resolve_inputs([str(tmp_path / "d" / "**" / "*.csv")], None, "text", None)
    assert len(every.paths) == 3


@pytest.mark.usefixtures("ray_local")
def test_an_lmbatch_output_read_as_input_gives_its_data_only(
    tiny_models, embedded_corpus, embedded_corpus_dir, tmp_path
):
    """The session's reference job's output (its ids the corpus's docs), read as
    the input of another job: its data files, not its checkpoint or summary."""
    from helpers import run_job

    first, _ = embedded_corpus
    assert (embedded_corpus_dir / "_checkpoint").is_dir()
    got = resolve_inputs([str(embedded_corpus_dir)], None, "id", None)
    assert got.paths and all("/_" not in p for p in got.paths)
    again, summary = run_job(
        tmp_path / "again", model=tiny_models["bert"], inputs=str(embedded_corpus_dir),
        task="embed", text_column="id", id_column="id",
    )  # fmt: skip
    assert summary.rows == 120 and set(again) == set(first)


def test_text_in_any_arrow_layout_is_text():
    """Polars writes large strings; a pandas categorical comes back from Parquet as
    dictionary-encoded strings."""
    words = ["a cat", None, "a cat", " "]
    for column in (
        pa.array(words, pa.large_string()),
        pa.array(words, pa.string_view()),
        pa.array(words).dictionary_encode(),
    ):
        text, error = check_text(pa.chunked_array([column]))
        assert text.to_pylist() == words, column.type
        assert error.to_pylist() == [
            None, "null_text: text is null", None, "empty_text: text is empty"
        ]  # fmt: skip


def test_calibration_text_from_compressed_and_categorical_files(tmp_path):
    with pa.output_stream(str(tmp_path / "a.jsonl.gz")) as f:
        f.write(b'{"text": "first"}\n{"text": "second"}\n')
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "part-0.csv").write_bytes(b"")  # an empty partition
    (tmp_path / "shards" / "part-1.csv").write_text("text\nthird\n")
    got = read_texts((str(tmp_path / "shards"),), "text", 10, "--calibration")
    assert got == ["third"]
    table = pa.table({"text": pa.array(["third", "fourth"]).dictionary_encode()})
    pq.write_table(table, tmp_path / "b.parquet")
    got = read_texts((str(tmp_path / "a.jsonl.gz"),), "text", 10, "--calibration")
    assert got == ["first", "second"]
    got = read_texts((str(tmp_path / "b.parquet"),), "text", 10, "--eval")
    assert got == ["third", "fourth"]
    (tmp_path / "c.tsv").write_text('id\ttext\n1\tfifth, sixth\n2\t"seventh"\n')
    got = read_texts((str(tmp_path / "c.tsv"),), "text", 10, "--eval")
    assert got == ["fifth, sixth", "seventh"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_calibration_text_in_another_encoding(tmp_path, fmt):
    """optimize --input-encoding: its text as written; without, one line saying
    what to do."""
    texts = ["café crème", "naïve résumé"]
    path = tmp_path / f"cal.{fmt}"
    lines = ["text", *texts] if fmt == "csv" else [
        json.dumps({"text": t}, ensure_ascii=False) for t in texts
    ]  # fmt: skip
    path.write_bytes("\n".join(lines).encode("cp1252") + b"\n")
    given = (str(path),)
    assert read_texts(given, "text", 10, "--calibration", encoding="cp1252") == texts
    says = {
        "csv": "--calibration: column 'text' of {} is not text: bytes that are not "
        "UTF-8 (--input-encoding names the file's)",
        "jsonl": "{}: cannot read as jsonl: 'utf-8' codec can't decode byte 0xe9 in "
        "position 13: invalid continuation byte (not utf-8 text: name the file's "
        "encoding with --input-encoding, e.g. cp1252, or convert it to UTF-8)",
    }[fmt]
    with pytest.raises(UserError) as e:
        read_texts(given, "text", 10, "--calibration")
    assert str(e.value) == says.format(path)


def test_calibration_pairs_keep_rows_whose_both_texts_are_there(tmp_path):
    """optimize --pair-column: (text, pair) rows, in every format; a row with either
    text blank or missing is left out, as a blank text is."""
    table = pa.table({"q": ["one", "two", " ", "four", "five"],
                      "p": ["uno", None, "tres", "", "cinco"]})  # fmt: skip
    pq.write_table(table, tmp_path / "qa.parquet")
    (tmp_path / "qa.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in table.to_pylist())
    )
    for name in ("qa.parquet", "qa.jsonl"):
        got = read_texts((str(tmp_path / name),), "q", 10, "--eval", pair="p")
        assert got == [("one", "uno"), ("five", "cinco")]
    with pytest.raises(UserError, match="--pair-column: .*'answer'"):
        read_texts((str(tmp_path / "qa.parquet"),), "q", 10, "--eval", pair="answer")


def save_hf_dataset(root, rows: int = 30):
    """A DatasetDict as Hugging Face datasets saves it: dataset_dict.json, and per
    split its Arrow shards beside state.json and dataset_info.json."""
    import datasets

    texts = [f"text number {i}" for i in range(rows)]
    data = datasets.Dataset.from_dict({"text": texts, "n": list(range(rows))})
    split = datasets.DatasetDict(
        train=data.select(range(20)), test=data.select(range(20, rows))
    )
    split.save_to_disk(str(root), num_shards={"train": 2, "test": 1})
    return texts


def test_a_hugging_face_dataset_folder_reads_its_data_files(tmp_path):
    texts = save_hf_dataset(tmp_path / "hf")
    (tmp_path / "hf" / "train" / "cache-0a1b.arrow").write_bytes(b"")  # map()'s
    got = resolve_inputs([str(tmp_path / "hf")], None, "text", "n")
    shards = sorted(str(p) for p in (tmp_path / "hf").rglob("data-*.arrow"))
    assert got.format == "arrow" and got.paths == shards and len(shards) == 3
    assert got.schema.field("n").type == pa.int64()
    one = resolve_inputs([str(tmp_path / "hf" / "train")], None, "text", None)
    assert len(one.paths) == 2
    globbed = resolve_inputs([str(tmp_path / "hf" / "train" / "*")], None, "text", None)
    assert globbed.paths == one.paths  # not its state.json and dataset_info.json
    with pytest.raises(UserError) as metadata:  # * does not enter the splits
        resolve_inputs([str(tmp_path / "hf" / "*")], None, "text", None)
    assert str(metadata.value) == (
        f"--input: {tmp_path}/hf/* matches Hugging Face datasets metadata only "
        f"(dataset_dict.json); give the dataset's folder, {tmp_path}/hf, to read its "
        "data files"
    )
    got = read_texts((str(tmp_path / "hf"),), "text", 100, "--calibration")
    assert got == texts[20:] + texts[:20]  # files in order: test/ before train/


def test_feather_and_arrow_files_in_either_ipc_layout(tmp_path):
    import pyarrow.feather as feather

    table = pa.table({"text": ["a", "b", "c"], "k": [1, 2, 3]})
    feather.write_feather(table, tmp_path / "rows.feather", chunksize=2)
    with pa.ipc.new_stream(str(tmp_path / "rows.arrow"), table.schema) as w:
        w.write_table(table, max_chunksize=2)
    for name in ("rows.feather", "rows.arrow"):
        got = resolve_inputs([str(tmp_path / name)], None, "text", "k")
        assert got.format == "arrow" and got.columns == ["text", "k"]
        assert read_texts((str(tmp_path / name),), "text", 10, "--eval") == [
            "a",
            "b",
            "c",
        ]
    (tmp_path / "rows.arrow.gz").write_bytes(b"")  # Arrow compresses inside
    with pytest.raises(UserError, match="cannot tell the format"):
        resolve_inputs([str(tmp_path / "rows.arrow.gz")], None, "text", None)


def test_inputs_that_are_all_empty_shards_say_so(tmp_path):
    """Zero-byte JSONL or CSV files (a partition with no rows) beside others are
    skipped; all of them empty, there is no column to read."""
    for name in ("part-0.jsonl", "part-1.jsonl"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(UserError) as e:
        resolve_inputs([str(tmp_path / "part-0.jsonl")], None, "text", None)
    assert str(e.value) == (
        f"--input: {tmp_path}/part-0.jsonl is empty (0 bytes): no rows, no columns "
        "to read"
    )
    with pytest.raises(UserError, match=r"all 2 input files are empty \(0 bytes; "):
        resolve_inputs([str(tmp_path)], None, "text", None)


def test_a_typed_column_that_cannot_hold_text_is_refused(tmp_path):
    """Parquet and Arrow say a column's type: numbers or lists as --text-column would
    make every row an error. Bytes (decoded as UTF-8) and a column of nulls alone (a
    partition of null texts) are read, row by row."""
    path = tmp_path / "rows.parquet"
    table = pa.table({"text": ["a"], "n": [1], "tags": [["x"]], "raw": [b"a"],
                      "none": pa.nulls(1)})  # fmt: skip
    pq.write_table(table, path)
    with pytest.raises(UserError) as e:
        resolve_inputs([str(path)], None, "n", None)
    assert str(e.value) == f"--text-column: 'n' is int64 in {path}, not text"
    with pytest.raises(UserError, match="--pair-column: 'tags' is list<"):
        resolve_inputs([str(path)], None, "text", None, pair_column="tags")
    for column in ("text", "raw", "none"):
        resolve_inputs([str(path)], None, column, None)


def test_an_input_encoding_is_a_text_formats_and_a_known_one(tmp_path):
    from lmbatch.jobs.spec import InferSpec

    table = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["a"]}), table)
    with pytest.raises(UserError) as e:
        resolve_inputs([str(table)], None, "text", None, encoding="cp1252")
    assert str(e.value) == (
        "--input-encoding: applies to CSV, TSV and JSONL; parquet text is UTF-8"
    )
    flags = dict(model="m", task="embed", inputs=("x.csv",), output="o")
    for given, says in [
        ("utf-16", "utf-16 is not ASCII-compatible; convert the files to UTF-8"),
        ("klingon", "unknown encoding 'klingon'"),
        ("base64", "'base64' is not a text encoding"),  # a bytes-to-bytes codec
    ]:
        with pytest.raises(UserError) as e:
            InferSpec.from_flags(input_encoding=given, **flags)
        assert str(e.value) == f"--input-encoding: {says}"
    assert InferSpec(input_encoding="latin-1", **flags).input_encoding == "iso8859-1"
