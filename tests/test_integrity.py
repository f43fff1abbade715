"""No silent wrong output: bad lines are bad rows, kept columns come through
unchanged, a resume knows its model and options, a memory probe never collapses, and
progress and error counts a person can trust."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.feather as pafeather
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from conftest import sentences
from helpers import run_job
from ray_head import LMBATCH
from safetensors.torch import load_file, save_file

from lmbatch.actors.batching import TokenBudget, run_batched
from lmbatch.actors.memory import CpuMemory, rss
from lmbatch.actors.model_info import TASK_COLUMNS
from lmbatch.errors import UserError
from lmbatch.jobs import encodings
from lmbatch.jobs import progress as progress_module
from lmbatch.jobs.progress import Pool, footer_rows, line, progress, waiting
from lmbatch.jobs.sources import Columns, CSVRows, ParquetRows
from lmbatch.jobs.summary import count_outcomes, start_sink

ray_job = pytest.mark.usefixtures("ray_local")


@ray_job
@pytest.mark.parametrize("suffix, sep", [("csv", ","), ("tsv", "\t")])
def test_a_malformed_csv_line_is_one_bad_row_and_the_file_goes_on(
    tiny_models, tmp_path, suffix, sep
):
    path = tmp_path / f"rows.{suffix}"
    lines = ["text,key", "the day,a", '"a long\nday",b', "the,way,extra",
             "one way,d", "my word,e"]  # fmt: skip
    path.write_text("".join(line.replace(",", sep) + "\n" for line in lines))
    rows, summary = run_job(
        tmp_path / "out", model=tiny_models["bert"], inputs=str(path), task="embed",
        keep_columns=("key",),
    )  # fmt: skip
    assert summary.rows == 5 and summary.errors == {"bad_csv": 1}
    bad = rows[f"{path}#2"]
    assert bad["error"] == "bad_csv: line has 3 fields, expected 2"
    # The rows after it keep their positions: as if the bad line were a row.
    assert {f"{path}#{i}" for i in (0, 1, 3, 4)} <= rows.keys()
    assert rows[f"{path}#3"]["error"] is None and rows[f"{path}#3"]["embedding"]
    assert rows[f"{path}#1"]["key"] == "b"  # the quoted text spans two lines
    if sep == "\t":  # read as CSV, a tab-separated header is one column
        with pytest.raises(
            UserError, match="header is tab-separated: --input-format tsv"
        ):
            run_job(
                tmp_path / "o2", model=tiny_models["bert"], inputs=str(path),
                task="embed", input_format="csv",
            )  # fmt: skip


@ray_job
def test_a_kept_cell_that_does_not_convert_is_that_rows_error(tiny_models, tmp_path):
    path = tmp_path / "rows.jsonl"
    lines = [{"text": "the day", "n": 1}, {"text": "one way", "n": "many"},
             {"text": "my word", "n": 3}]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in lines))
    rows, summary = run_job(
        tmp_path / "out", model=tiny_models["bert"], inputs=str(path), task="embed",
        keep_columns=("n",),
    )  # fmt: skip
    assert summary.rows == 3 and summary.errors == {"bad_value": 1}
    assert [rows[f"{path}#{i}"]["n"] for i in range(3)] == [1, None, 3]
    assert "'many' is not int64" in rows[f"{path}#1"]["error"]
    assert (
        pq.read_schema(next((tmp_path / "out").glob("*.parquet"))).field("n").type
        == pa.int64()
    )


def test_only_reading_errors_become_bad_file_rows(corpus, monkeypatch):
    """A bug in lmbatch's own normalisation is a bug, not a row of bad data."""
    source = ParquetRows([corpus["parquet"]], Columns("text", "doc"))

    def broken(self, table, path):
        raise ValueError("a bug in lmbatch")

    monkeypatch.setattr(ParquetRows, "_normalise", broken)
    with open(corpus["parquet"], "rb") as f, pytest.raises(ValueError, match="a bug"):
        list(source._read_stream(pa.PythonFile(f), corpus["parquet"]))


def test_a_csv_row_longer_than_pyarrows_block_is_read_or_named(tmp_path, monkeypatch):
    """A long document in a CSV (3 MB, where pyarrow's default block is 1 MiB) is a
    row like any other, and so are the rows after it. One longer than the block
    lmbatch reads is a bad_file row that says what to do, not pyarrow's hint."""
    path = tmp_path / "long.csv"
    texts = ["short", "word " * 600_000, "after"]
    pacsv.write_csv(pa.table({"text": texts}), path)

    def read() -> pa.Table:
        source = CSVRows([str(path)], Columns("text"))
        with open(path, "rb") as f:
            return pa.concat_tables(source._read_stream(pa.PythonFile(f), str(path)))

    got = read()
    assert got["_text"].to_pylist() == texts and got["_error"].null_count == 3
    monkeypatch.setattr(encodings, "CSV_BLOCK", 1 << 20)
    assert read()["_error"].to_pylist() == [
        None,
        f"bad_file: {path} unreadable from row 1: a CSV row longer than 1 MiB, or "
        "a quote never closed (put texts that long in JSONL or Parquet)",
    ]


@ray_job
@pytest.mark.parametrize(
    "fmt, task, model",
    [("parquet", "embed", "bert"), ("jsonl", "score", "gpt2"),
     ("csv", "classify", "bert_cls")],
)  # fmt: skip
def test_kept_columns_come_through_unchanged(fmt, task, model, tiny_models, tmp_path):
    table = pa.table({
        "text": sentences(30, seed=7),
        "url": [f"https://example.org/{i}" for i in range(30)],
        "lang": ["en", "fr", None] * 10,
        "year": pa.array(range(1990, 2020), pa.int32()),
    })  # fmt: skip
    path = write(table, tmp_path / f"rows.{fmt}", fmt)
    rows, _ = run_job(
        tmp_path / "out", model=tiny_models[model], inputs=path, task=task,
        keep_columns=("url", "lang", "year"),
    )  # fmt: skip
    by_url = {r["url"]: r for r in rows.values()}
    for i, url in enumerate(table["url"].to_pylist()):
        lang = table["lang"][i].as_py()
        assert by_url[url]["lang"] == ("" if fmt == "csv" and lang is None else lang)
        year = by_url[url]["year"]
        assert year == (str(1990 + i) if fmt == "csv" else 1990 + i)
        assert all(by_url[url][c] is not None for c in TASK_COLUMNS[task])
    schema = pq.read_schema(next((tmp_path / "out").glob("*.parquet")))
    # Types kept: Parquet's own, JSON's numbers, CSV's text.
    kept = {"parquet": pa.int32(), "jsonl": pa.int64(), "csv": pa.string()}[fmt]
    assert schema.field("year").type == kept


def write(table: pa.Table, path: Path, fmt: str) -> str:
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt == "csv":
        table.to_pandas().to_csv(path, index=False)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    return str(path)


@ray_job
def test_star_keeps_every_column_and_collisions_are_refused(
    tiny_models, corpus, tmp_path
):
    rows, _ = run_job(
        tmp_path / "out", model=tiny_models["bert"], inputs=corpus["parquet"],
        task="embed", keep_columns=("*",),
    )  # fmt: skip
    some = next(iter(rows.values()))
    assert {"doc", "text", "embedding", "id", "error"} <= some.keys()
    with pytest.raises(UserError, match="--keep-columns: no column 'nope'"):
        run_job(
            tmp_path / "o2", model=tiny_models["bert"], inputs=corpus["parquet"],
            task="embed", keep_columns=("nope",),
        )  # fmt: skip
    clash = tmp_path / "clash.parquet"
    table = pa.table({"text": ["the day"], "embedding": ["x"], "truncated": [1]})
    pq.write_table(table, clash)
    for name in ("embedding", "truncated"):
        with pytest.raises(UserError, match=f"'{name}' is a column of the output"):
            run_job(
                tmp_path / "o3", model=tiny_models["bert"], inputs=str(clash),
                task="embed", keep_columns=(name,),
            )  # fmt: skip
    # Where nothing is cut there is no truncated column: the input's may be kept,
    # and is data, not a count of rows cut.
    rows, summary = run_job(
        tmp_path / "o4", model=tiny_models["bert"], inputs=str(clash),
        task="embed", keep_columns=("truncated",), on_long="error",
    )  # fmt: skip
    assert next(iter(rows.values()))["truncated"] == 1 and summary.truncated == 0


@ray_job
def test_a_resume_keeps_the_columns_and_knows_its_model_and_options(
    tiny_models, corpus, tmp_path
):
    model = tmp_path / "model"
    shutil.copytree(tiny_models["bert"], model)
    args = dict(
        model=str(model), inputs=corpus["parquet"], task="embed", id_column="doc",
        keep_columns=("text",),
    )  # fmt: skip
    out = tmp_path / "out"
    first, _ = run_job(out, **args)
    again, summary = run_job(out, resume=True, **args)
    assert summary.restored == 120 and summary.computed == 0
    assert again == first and all(r["text"] for r in again.values())
    with pytest.raises(UserError, match="--resume: .* another --on-long"):
        run_job(out, resume=True, on_long="error", **args)
    with pytest.raises(UserError, match="another --keep-columns"):
        run_job(out, resume=True, **{**args, "keep_columns": ()})
    # A fine-tuned checkpoint: the same files, names and shapes, other weights.
    weights = model / "model.safetensors"
    state = load_file(weights)
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(
        UserError, match=r"another --model \(the content of its files\)"
    ):
        run_job(out, resume=True, **args)


def test_without_a_resettable_peak_the_budget_does_not_collapse(tmp_path):
    """Where /proc/self/clear_refs cannot be written, the resident set is sampled:
    an earlier, larger peak of the process does not make every batch look over."""
    spike = torch.ones(200 << 20, dtype=torch.uint8)  # 200 MiB, then freed
    spike.add_(1)
    del spike
    unwritable = tmp_path / "clear_refs"
    unwritable.mkdir()  # cannot be opened for writing, as in some containers
    memory = CpuMemory(rss() + (100 << 20), clear_refs=str(unwritable))
    assert memory.method == "sampled RSS"
    budget = TokenBudget(tokens=64, ceiling=256, grow_after=2)

    def step(rows: np.ndarray) -> None:
        memory.start()
        torch.ones(1 << 20).sum()  # a small batch: 4 MiB

    lengths = np.full(64, 8)
    list(run_batched(lengths, budget, step, None, over_limit=memory.over_limit))
    assert budget.ooms == 0 and budget.tokens == 256  # grew, never halved


def test_the_progress_line():
    assert line(48_128, 120_000, 40.0, 3) == (
        "48,128 of 120,000 rows (40%)  1,203 rows/s  ETA 59s  errors 3"
    )
    assert line(500, None, 10.0, 0) == "500 rows  50 rows/s  errors 0"


@ray_job
def test_progress_says_what_it_waits_for_and_prints_while_the_job_runs(monkeypatch):
    assert waiting(2, Pool(actors=2, gpus=0)) is None
    assert waiting(0, Pool(actors=2, gpus=0)) == "waiting for 2 of 2 actors"
    assert waiting(1, Pool(actors=4, gpus=2)) == (
        "waiting for 3 of 4 GPU actors; the autoscaler is starting nodes"
    )  # the session's Ray has no GPU: they have yet to come
    monkeypatch.setattr(progress_module, "LOGGED_EVERY_S", 0.0)
    monkeypatch.setattr(progress_module, "LIVE_EVERY_S", 0.05)
    sink = start_sink()
    sink.report.remote({"actor": "a", "pid": 1, "rows": 30, "errors": 2})
    out = io.StringIO()
    counted = threading.Event()

    def total() -> int:  # footers on slow storage: the lines go on meanwhile
        counted.wait(10)
        return 120

    def printed(text: str) -> bool:
        deadline = time.monotonic() + 10
        while text not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        return text in out.getvalue()

    with progress(sink, Pool(actors=1, gpus=0), total, restored=10, out=out):
        assert printed("40 rows  ")  # no total yet, and no wait for it
        counted.set()
        assert printed("40 of 120 rows (33%)")
    assert "errors 2" in out.getvalue()


def test_the_total_comes_from_every_footer_or_none(tmp_path):
    paths = []
    for i in range(40):
        paths.append(str(tmp_path / f"part-{i}.parquet"))
        pq.write_table(pa.table({"text": ["a"] * i}), paths[-1])
    fs = pafs.LocalFileSystem()
    assert footer_rows(fs, paths, "parquet") == sum(range(40))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    assert (
        footer_rows(fs, [*paths, str(tmp_path / "broken.parquet")], "parquet") is None
    )
    table = pa.table({"text": ["a"] * 30})
    feather, stream = str(tmp_path / "t.feather"), str(tmp_path / "t.arrow")
    pafeather.write_feather(table, feather, chunksize=7)  # the file layout
    with pa.ipc.new_stream(stream, table.schema) as writer:  # as datasets writes
        writer.write_table(table)
    assert footer_rows(fs, [feather, feather], "arrow") == 60
    assert footer_rows(fs, [feather, stream], "arrow") is None  # no footer
    assert footer_rows(fs, [feather], "jsonl") is None


@ray_job
def test_the_cli_prints_one_line_not_ray_datas_tables(tiny_models, corpus, tmp_path):
    done = subprocess.run(
        [str(LMBATCH), "infer", "--model", tiny_models["bert"], "--task", "embed",
         "--input", corpus["parquet"], "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "of 120 rows" in done.stderr
    assert "Progress will be logged" not in done.stderr  # Ray Data's own tables
    assert "Progress bars disabled" not in done.stderr
    assert "Execution plan of Dataset" not in done.stderr  # nor its INFO notes
    assert "Data sink Parquet finished" not in done.stderr


def test_errors_are_counted_by_arrow_compute(tmp_path):
    kinds = ["bad_json: x", "too_long: 9 tokens > --max-length 8", None, None,
             "bad_json: line is not an object"]  # fmt: skip
    errors = [kinds[i % len(kinds)] for i in range(200_000)]
    cut = [None if e else i % 3 == 0 for i, e in enumerate(errors)]
    table = pa.table({"error": errors, "truncated": pa.array(cut, pa.bool_())})
    pq.write_table(table, tmp_path / "part.parquet")
    found = count_outcomes(pads.dataset(tmp_path, format="parquet"))
    want = Counter(e.split(":", 1)[0] for e in errors if e)
    assert found.rows == 200_000 and found.errors == want
    assert found.truncated == sum(c is True for c in cut) > 0


def test_task_columns_name_what_the_heads_write(tiny_models):
    from lmbatch.actors.model_info import ModelSpec, inspect_model
    from lmbatch.actors.predict import PredictorConfig
    from lmbatch.actors.predictor import Predictor

    for task, model in (("embed", "bert"), ("score", "gpt2"),
                        ("classify", "bert_cls"), ("generate", "gpt2")):  # fmt: skip
        path = tiny_models[model]
        info = inspect_model(path, task)
        actor = Predictor(PredictorConfig(ModelSpec(path, task), info, max_length=16))
        assert tuple(actor.head.schema.names) == TASK_COLUMNS[task]
