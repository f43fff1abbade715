"""What an output directory may be before a job writes there (``jobs/output.py``):
``--overwrite`` replaces only an earlier lmbatch output. No Ray, no model loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmbatch.actors.storage import filesystem_of
from lmbatch.errors import UserError
from lmbatch.jobs.output import (
    INFER_MARKERS,
    OPTIMIZE_MARKERS,
    check_output,
    create_output,
    holds_output,
)


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model"
    path.mkdir()
    return str(path)


def test_a_missing_or_empty_output_is_taken(tmp_path, model):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new" / "dir", tmp_path / "empty"):
        fs, path = check_output(str(out), model, INFER_MARKERS)
        assert path == str(out)


@pytest.mark.parametrize("overwrite", [False, True])
def test_files_no_lmbatch_job_wrote_are_refused(tmp_path, model, overwrite):
    out = tmp_path / "project"
    out.mkdir()
    for name in ("README.md", "data.parquet", "notes.txt", "src", "train.py"):
        (out / name).write_text("mine")
    with pytest.raises(UserError) as e:
        check_output(str(out), model, INFER_MARKERS, overwrite=overwrite)
    assert str(e.value) == (
        f"--output: {out} holds files no lmbatch job wrote (README.md, data.parquet, "
        "notes.txt and 2 more); --overwrite replaces only an earlier lmbatch output: "
        "write elsewhere"
    )
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("markers", "marker"),
    [(INFER_MARKERS, "_job.json"), (INFER_MARKERS, "_summary.json"),
     (OPTIMIZE_MARKERS, "lmbatch.json")],
)  # fmt: skip
def test_an_earlier_lmbatch_output_is_replaced_with_overwrite(
    tmp_path, model, markers, marker
):
    out = tmp_path / "out"
    out.mkdir()
    (out / marker).write_text("{}")
    (out / "part-0.parquet").write_bytes(b"rows")
    with pytest.raises(UserError, match="already holds files; pass --overwrite"):
        check_output(str(out), model, markers)
    check_output(str(out), model, markers, overwrite=True)


def test_each_job_knows_only_its_own_outputs(tmp_path, model):
    """An infer job's output is not an artifact, nor an artifact an infer output."""
    infer_out, artifact = tmp_path / "embeddings", tmp_path / "artifact"
    for out, marker in ((infer_out, "_job.json"), (artifact, "lmbatch.json")):
        out.mkdir()
        (out / marker).write_text("{}")
    with pytest.raises(UserError, match="no lmbatch job wrote"):
        check_output(str(infer_out), model, OPTIMIZE_MARKERS, overwrite=True)
    with pytest.raises(UserError, match="no lmbatch job wrote"):
        check_output(str(artifact), model, INFER_MARKERS, overwrite=True)


def test_resume_leaves_the_record_check_to_the_resume(tmp_path, model):
    """--resume continues what is there; resume.py refuses one with no job record."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    check_output(str(out), model, INFER_MARKERS, resume=True)


def test_a_file_or_the_model_is_no_output(tmp_path, model):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file; give a directory"):
        check_output(str(tmp_path / "file"), model, INFER_MARKERS, overwrite=True)
    with pytest.raises(UserError, match="holds --model"):
        check_output(str(tmp_path), model, INFER_MARKERS, overwrite=True)


def test_an_output_that_cannot_be_made_is_named_before_ray_starts(tmp_path, model):
    (tmp_path / "rows.csv").write_text("text\nx\n")
    inside_a_file = tmp_path / "rows.csv" / "out" / "deeper"
    with pytest.raises(UserError) as e:
        check_output(str(inside_a_file), model, INFER_MARKERS)
    assert str(e.value) == (
        f"--output: cannot create {inside_a_file}: {tmp_path / 'rows.csv'} is a file"
    )


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="Linux's /proc")
def test_a_folder_the_filesystem_refuses_is_one_line():
    """Where no folder can be made (here /proc, even for root), the first write
    says so naming --output, not with pyarrow's traceback."""
    fs, path = filesystem_of("/proc/lmbatch-test/out", "--output")
    with pytest.raises(UserError) as e:
        create_output(fs, path, "/proc/lmbatch-test/out")
    assert str(e.value).startswith(
        "--output: cannot create /proc/lmbatch-test/out: [Errno 2] Cannot create "
        "directory '/proc/lmbatch-test'"
    )


@pytest.mark.parametrize(
    ("left", "held"),
    [
        ({"_job.json": "{}"}, False),
        ({"_job.json": "{}", "_checkpoint/": None, "_writer.json": "{}"}, False),
        ({"_job.json": "{}", "_checkpoint/ids.parquet": "ids"}, True),
        ({"_job.json": "{}", "part-0.parquet": "rows"}, True),
        ({"_job.json": "{}", "_summary.json": "{}"}, True),  # a job of no rows, done
        ({"_checkpoint/": None}, True),  # no record: not known to be lmbatch's
    ],
)
def test_the_record_of_a_job_that_wrote_no_row_protects_nothing(
    tmp_path, model, left, held
):
    """A job stopped before its first row (a user's mistake its tasks found) leaves
    its record, Ray Data's empty checkpoint folder and, killed, its lease: the
    corrected job starts there without --overwrite; any row, or a finished job's
    summary, is an output to protect."""
    out = tmp_path / "out"
    for name, text in left.items():  # "dir/": a folder, empty
        folder = out / name if text is None else (out / name).parent
        folder.mkdir(parents=True, exist_ok=True)
        if text is not None:
            (out / name).write_text(text)
    assert holds_output(*_local(out)) is held
    if held and "_job.json" in left:
        with pytest.raises(UserError, match="pass --overwrite"):
            check_output(str(out), model, INFER_MARKERS)
    elif not held:
        check_output(str(out), model, INFER_MARKERS)
        with pytest.raises(UserError, match="no lmbatch job wrote"):  # not optimize's
            check_output(str(out), model, OPTIMIZE_MARKERS, overwrite=True)


def _local(path):
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem(), str(path)
