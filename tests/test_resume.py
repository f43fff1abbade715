"""--resume after the driver was killed: Ray Data's checkpoint restores finished rows;
nothing is lost, nothing duplicated; another job's output is refused."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import run_job, write_rows
from ray_head import LMBATCH

from lmbatch.errors import UserError
from lmbatch.jobs.cli import cli
from lmbatch.jobs.lease import WRITER_FILE
from lmbatch.jobs.resume import CHECKPOINT_DIR, JOB_FILE, PENDING_SUFFIX
from lmbatch.jobs.summary import Summary

# Enough that the job still runs well after its first file is committed: on 2 slow
# cores about 1,500 rows were written by the time the test killed it.
ROWS = 9_000


def ids_in(out: Path) -> list[str]:
    return (
        pads.dataset(out, format="parquet").to_table(columns=["id"])["id"].to_pylist()
    )


def committed(out: Path) -> list[Path]:
    """Checkpoints of finished files. A data file can be seen before its checkpoint
    is committed; killed then, the file is deleted and recomputed on --resume."""
    files = (out / CHECKPOINT_DIR).glob("*.parquet")
    return [f for f in files if not f.name.endswith(PENDING_SUFFIX)]


def start_long_job(
    gpt2: str, tmp_path: Path
) -> tuple[list[str], Path, subprocess.Popen]:
    """An ``lmbatch infer`` process, once the first of its many files is committed."""
    data = tmp_path / "rows.jsonl"
    write_rows(data, ROWS)
    out = tmp_path / "out"
    args = [
        str(LMBATCH), "infer", "--model", gpt2, "--task", "generate",
        "--max-new-tokens", "8", "--input", str(data), "--output", str(out),
        "--batch-rows", "50", "--rows-per-file", "50",
    ]  # fmt: skip
    driver = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not committed(out):  # the first of several files, its checkpoint committed
        assert driver.poll() is None, driver.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no output files came"
        time.sleep(0.2)
    return args, out, driver


@pytest.fixture(scope="module")
def finished_job(ray_local, tiny_models, corpus, tmp_path_factory):
    """(flags, output, rows) of one finished embed job, run once for the module:
    tests resume a copy of it (an output moved whole is still resumable), since a
    job is most of a test's time (its actor's start-up)."""
    flags = dict(model=tiny_models["bert"], inputs=corpus["parquet"], task="embed")
    out = tmp_path_factory.mktemp("finished") / "out"
    rows, _ = run_job(out, **flags)
    return flags, out, rows


@pytest.mark.fault("the driver killed (SIGKILL) mid-job, then --resume")
def test_driver_killed_then_resume_loses_and_duplicates_nothing(
    tiny_models, tmp_path, fault_report
):
    args, out, driver = start_long_job(tiny_models["gpt2"], tmp_path)
    # While it writes, a second run on its output is refused before its Ray starts:
    # both would write the rows not yet committed.
    second = CliRunner().invoke(cli, [*args[1:], "--resume"])
    assert second.exit_code != 0
    assert f"--output: another lmbatch job is writing {out}" in second.output
    # The driver dies, and with it (as on a lost machine) the Ray it started: every
    # process of its tree, by pid.
    tree = psutil.Process(driver.pid).children(recursive=True)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()

    assert (out / WRITER_FILE).exists()  # the killed run's lease, gone with it
    done = subprocess.run(
        [*args, "--resume"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Ray Data's notes on loading the checkpoint stay off the console.
    notes = [line for line in done.stderr.splitlines() if "INFO " in line]
    assert all("Started a local Ray instance" in line for line in notes), notes
    assert not (out / WRITER_FILE).exists()
    ids = ids_in(out)
    assert len(ids) == ROWS and len(set(ids)) == ROWS
    restored = int(done.stdout.split("restored ")[1].split()[0])
    computed = int(done.stdout.split("computed ")[1].split()[0])
    assert restored > 0 and computed > 0 and restored + computed == ROWS
    summary = json.loads((out / "_summary.json").read_text())
    started = sum(a["rows_started"] for a in summary["actors"])
    fault_report(ROWS, ids, started, restored=restored)


def test_ctrl_c_stops_a_job_in_one_line_and_leaves_it_resumable(tiny_models, tmp_path):
    _, out, driver = start_long_job(tiny_models["gpt2"], tmp_path)
    tree = psutil.Process(driver.pid).children(recursive=True)
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=120)
    assert driver.returncode == 130, err[-3000:]
    assert "Traceback" not in err.decode()
    kept = pads.dataset(committed(out), format="parquet").count_rows()
    assert kept > 0 and not (out / WRITER_FILE).exists()
    assert err.decode().strip().splitlines()[-1] == (
        f"interrupted: {kept:,} rows written to {out} are kept; the same command "
        "with --resume (not --overwrite) goes on from them"
    )
    deadline = time.monotonic() + 30  # the Ray it started stops with it
    while running := [p for p in tree if _runs(p)]:
        if time.monotonic() > deadline:
            for p in running:
                p.kill()
            pytest.fail(f"left running: {[p.name() for p in running]}")
        time.sleep(0.5)


def test_an_interrupt_before_any_row_says_to_run_it_again(tmp_path):
    """Its output holds the job's record alone, which the same command starts over
    without --overwrite or --resume (tests/test_output.py)."""
    from lmbatch.jobs.cli import interrupted

    out = tmp_path / "out"
    (out / CHECKPOINT_DIR).mkdir(parents=True)
    (out / JOB_FILE).write_text("{}")
    assert interrupted("infer", str(out)) == (
        f"interrupted before a row was written to {out}: run it again"
    )


def _runs(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_resume_of_a_finished_job_computes_nothing(finished_job, tmp_path):
    """Nor starts the pool: the footers say 120 rows, all committed."""
    flags, done, first = finished_job
    shutil.copytree(done, tmp_path / "out")
    again, summary = run_job(tmp_path / "out", resume=True, **flags)
    assert (summary.restored, summary.computed, summary.missing()) == (120, 0, [])
    assert again.keys() == first.keys() and len(ids_in(tmp_path / "out")) == 120
    assert summary.actors == [] and summary.errors == {}
    assert "pool not started: the output holds all 120 input rows" in summary.lines()
    written = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert (written["restored"], written["computed"], written["input_rows"]) == (
        120, 0, 120,
    )  # fmt: skip


def test_a_resume_that_skips_rows_of_repeated_ids_says_so(
    ray_local, tiny_models, tmp_path
):
    data = tmp_path / "rows.parquet"
    keys = [str(i % 60) for i in range(120)]  # every id twice
    texts = [f"the word {i} is one of many" for i in range(120)]
    pq.write_table(pa.table({"text": texts, "key": keys}), data)
    out = tmp_path / "out"
    flags = dict(model=tiny_models["bert"], inputs=str(data), task="embed",
                 id_column="key", batch_rows=20, rows_per_file=20)  # fmt: skip
    _, summary = run_job(out, **flags)
    assert (summary.rows, summary.input_rows, summary.missing()) == (120, 120, [])
    # As if the run had been killed before one file was committed: it and its
    # checkpoint are gone. Its rows' ids that a finished file also holds are skipped.
    checkpoint = committed(out)[0]
    gone = pq.read_table(checkpoint)["id"].to_pylist()
    data_file = next(
        f for f in out.glob("*.parquet") if sorted(ids_in(f)) == sorted(gone)
    )
    checkpoint.unlink()
    data_file.unlink()
    kept = set(ids_in(out))
    lost = sum(1 for key in gone if key in kept)
    _, summary = run_job(out, resume=True, **flags)
    assert summary.input_rows == 120 and summary.rows == 120 - lost and lost > 0
    assert summary.missing() == [
        f"warning: {lost} input rows have no output row: --resume skips every row "
        "whose --id-column value a finished file holds, so ids that repeat skip "
        "rows; run again with --overwrite and ids that do not repeat (or no "
        "--id-column)"
    ]
    assert summary.missing()[0] in summary.lines()


def test_a_sample_with_limit_then_the_rest_with_resume(
    ray_local, tiny_models, corpus, tmp_path
):
    out = tmp_path / "out"
    flags = dict(model=tiny_models["bert"], inputs=corpus["parquet"], task="embed",
                 batch_rows=16, rows_per_file=16, max_length=8)  # fmt: skip
    _, summary = run_job(out, limit=50, **flags)
    assert (summary.rows, summary.computed, summary.missing()) == (50, 50, [])
    assert summary.lines()[2].startswith("rows 50 of 120 input rows (--limit 50)  ")
    _, summary = run_job(out, limit=50, resume=True, **flags)  # 50 more, none again
    assert (summary.restored, summary.computed) == (50, 50)
    rows, summary = run_job(out, resume=True, **flags)
    assert (summary.restored, summary.computed, summary.missing()) == (100, 20, [])
    ids = ids_in(out)
    assert len(ids) == 120 and set(ids) == set(rows) and len(set(ids)) == 120
    full, whole = run_job(tmp_path / "whole", **flags)
    for key, row in rows.items():
        assert row["embedding"] == pytest.approx(full[key]["embedding"], abs=1e-5)
        assert row["truncated"] == full[key]["truncated"]
    # The rows cut, counted over the whole output: the earlier runs' rows too.
    assert summary.truncated == whole.truncated > 0


def test_a_dry_run_checks_and_plans_but_writes_nothing(
    tiny_models, corpus, finished_job, tmp_path
):
    from lmbatch.jobs.run import run_job as launch
    from lmbatch.jobs.spec import InferSpec

    out = tmp_path / "out"
    flags = dict(model=tiny_models["bert"], inputs=(corpus["parquet"],),
                 task="embed", output=str(out))  # fmt: skip
    lines = launch("infer", InferSpec(dry_run=True, limit=7, **flags), None)
    assert lines[0] == "dry run: nothing was run or written"
    assert lines[1].endswith(": embed, fp32 (auto on CPU) on cpu"), lines[1]
    assert "inputs 1 parquet files, 120 rows; --limit 7 new rows at most" in lines
    assert f"output {out}: new" in lines and not out.exists()
    assert "columns id, embedding, error, truncated" in lines
    shutil.copytree(finished_job[1], out)  # the job those flags run, finished
    written = pads.dataset(out, format="parquet").schema.names
    assert written == ["id", "embedding", "error", "truncated"]  # as planned
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
    lines = launch("infer", InferSpec(dry_run=True, resume=True, **flags), None)
    assert (
        f"output {out}: --resume keeps its 120 finished rows, all the input's: the "
        "pool would not start"
    ) in lines
    lines = launch("infer", InferSpec(dry_run=True, overwrite=True, **flags), None)
    assert f"output {out}: --overwrite replaces the earlier job's output" in lines
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    # What only the tokenizer tells, as a run finds it while it starts.
    with pytest.raises(UserError, match="--max-length: 2 tokens: no room for a text"):
        launch(
            "infer",
            InferSpec(dry_run=True, max_length=2, overwrite=True, **flags),
            None,
        )


def test_rows_out_against_rows_in_where_the_inputs_say():
    def summary(rows: int, input_rows: int | None, restored: int = 0) -> Summary:
        return Summary(rows, 0, 1.0, 0.0, 0.0, {}, restored=restored,
                       input_rows=input_rows)  # fmt: skip

    assert summary(120, None).missing() == []  # JSONL, CSV: not known
    assert summary(120, 120).lines()[2].startswith("rows 120 of 120 input rows  ")
    assert summary(118, 120).missing() == [
        "warning: 2 input rows have no output row; please report this with its "
        "_summary.json"
    ]  # no resume skipped them: a bug
    broken = summary(100, 120)
    broken.errors = {"bad_file": 1}  # a Parquet file cut short: its footer said more
    assert broken.missing() == [
        "warning: 20 input rows have no output row: a file that could not be read "
        "whole is one bad_file row"
    ]
    assert summary(121, 120, restored=50).missing() == [
        "warning: the output holds 1 row more than its inputs; please report this "
        "with its _summary.json"
    ]


def test_resume_refuses_another_jobs_output(tiny_models, finished_job, tmp_path):
    flags, done, _ = finished_job
    shutil.copytree(done, tmp_path / "out")
    with pytest.raises(UserError) as e:
        run_job(
            tmp_path / "out", resume=True, **{**flags, "model": tiny_models["bert_st"]}
        )
    assert e.value.where == "--resume" and "model" in e.value.message


def test_resume_refuses_rows_with_other_columns(ray_local, tiny_models, tmp_path):
    """An output an earlier lmbatch wrote for the same job, before score had
    is_greedy: the record matches, its rows' columns do not, and one dataset cannot
    hold both; so --resume is refused, and the output is left as it was."""
    flags = dict(model=tiny_models["gpt2"], task="score")
    write_rows(tmp_path / "in.jsonl", 20)
    run_job(tmp_path / "out", inputs=str(tmp_path / "in.jsonl"), **flags)
    run_job(tmp_path / "out", inputs=str(tmp_path / "in.jsonl"), resume=True,
            **flags)  # the same columns: resumes, and has nothing to do  # fmt: skip
    for data in (tmp_path / "out").glob("*.parquet"):
        pq.write_table(pq.read_table(data).drop_columns(["is_greedy"]), data)
    before = sorted(
        (p.name, p.stat().st_mtime_ns) for p in (tmp_path / "out").rglob("*")
    )
    with pytest.raises(UserError) as e:
        run_job(tmp_path / "out", inputs=str(tmp_path / "in.jsonl"), resume=True,
                **flags)  # fmt: skip
    assert e.value.where == "--resume"
    assert "this job's, not theirs: ['is_greedy']" in e.value.message
    after = sorted(
        (p.name, p.stat().st_mtime_ns) for p in (tmp_path / "out").rglob("*")
    )
    assert after == before


def test_resume_names_the_input_files_that_changed(ray_local, tiny_models, tmp_path):
    parts = tmp_path / "in"
    parts.mkdir()
    for i in range(4):
        write_rows(parts / f"part-{i}.jsonl", 5, start=5 * i)
    flags = dict(model=tiny_models["bert"], inputs=str(parts), task="embed")
    run_job(tmp_path / "out", **flags)
    write_rows(parts / "part-4.jsonl", 5)
    (parts / "part-0.jsonl").unlink()
    with pytest.raises(UserError) as e:
        run_job(tmp_path / "out", resume=True, **flags)
    assert e.value.where == "--resume" and e.value.message.endswith(
        f"another --input: 4 then, 4 now; new: {parts}/part-4.jsonl; "
        f"gone: {parts}/part-0.jsonl; use a new --output"
    )


def test_resume_refuses_an_input_rewritten_under_its_name(
    ray_local, tiny_models, tmp_path
):
    """A nightly export to the same path, resumed as a retry loop would: the rows
    written came from the old file, so the job is refused, not quietly mixed."""
    data = tmp_path / "in.jsonl"
    write_rows(data, 10)
    flags = dict(model=tiny_models["bert"], inputs=str(data), task="embed")
    run_job(tmp_path / "out", **flags)
    _, summary = run_job(tmp_path / "out", resume=True, **flags)  # unchanged
    assert (summary.restored, summary.computed) == (10, 0)
    write_rows(data, 12, start=100)
    with pytest.raises(UserError) as e:
        run_job(tmp_path / "out", resume=True, **flags)
    assert e.value.where == "--resume"
    assert re.fullmatch(
        rf".* was written from another version of {re.escape(str(data))} \(then "
        r"[\d,]+ bytes of 20\d\d-[\d-]+ [\d:]+\+00:00, now [\d,]+ bytes of .*\); "
        r"use a new --output",
        e.value.message,
    ), e.value.message


def test_resume_needs_a_job_to_resume(ray_local, tiny_models, corpus, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("not ours")
    with pytest.raises(UserError, match=f"no lmbatch job to resume .no {JOB_FILE}"):
        run_job(
            tmp_path / "out", model=tiny_models["bert"], inputs=corpus["parquet"],
            task="embed", resume=True,
        )  # fmt: skip


def test_resume_and_overwrite_together_are_refused(tiny_models, corpus, tmp_path):
    with pytest.raises(UserError, match="--resume"):
        run_job(
            tmp_path / "out", model=tiny_models["bert"], inputs=corpus["parquet"],
            task="embed", resume=True, overwrite=True,
        )  # fmt: skip


def test_a_half_written_file_of_the_killed_run_is_not_counted_or_kept(
    ray_local, tiny_models, corpus, tmp_path
):
    """What a driver killed mid-write leaves: a data file without its footer and the
    pending checkpoint naming it. Resume counts committed rows only, and Ray Data's
    recovery removes the torn file."""
    out = tmp_path / "out"
    flags = dict(model=tiny_models["bert"], inputs=corpus["parquet"], task="embed")
    run_job(out, **flags)
    torn = "torn_000000"
    (out / f"{torn}-0.parquet").write_bytes(b"PAR1 half a file")
    pq.write_table(
        pa.table({"id": ["x"]}), out / "_checkpoint" / f"{torn}.pending.parquet"
    )
    rows, summary = run_job(out, resume=True, **flags)
    assert (summary.restored, summary.computed) == (120, 0)
    assert len(rows) == 120 and not (out / f"{torn}-0.parquet").exists()
