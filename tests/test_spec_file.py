"""``--spec FILE``: a job's flags as YAML, the command line winning over the file."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from test_cli_errors import assert_user_error

from lmbatch.jobs.cli import cli


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def write_spec(path, **values) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


@pytest.mark.usefixtures("ray_local")
def test_a_spec_file_runs_the_job_and_flags_win_over_it(tiny_models, corpus, tmp_path):
    spec = write_spec(
        tmp_path / "job.yaml",
        model=tiny_models["bert"],
        task="embed",
        input=[corpus["parquet"], corpus["parquet"]],  # a list, as --input a b
        output=str(tmp_path / "from-file"),
        **{"max-length": 16, "keep_columns": "doc", "actor-memory": "1GiB"},
    )
    out = tmp_path / "from-flag"
    done = invoke("infer", "--spec", spec, "--output", str(out), "--max-length", "12")
    assert done.exit_code == 0, done.output
    assert not (tmp_path / "from-file").exists()
    record = json.loads((out / "_job.json").read_text())
    assert record["max_length"] == 12 and record["keep_columns"] == ["doc:string"]
    table = pq.read_table(out)
    assert table.num_rows == 120 and table.column_names[-1] == "doc"


JOB = {"model": "m", "task": "embed", "input": "in.parquet", "output": "out"}


@pytest.mark.parametrize(
    "command,values,fragments",
    [
        ("infer", {"batch-tokns": 4},
         ["--spec", "no flag --batch-tokns here; did you mean batch-tokens?"]),
        ("infer", {**JOB, "batch-tokens": "many"},
         ["--batch-tokens: expected int", "(in "]),
        ("infer", {**JOB, "actors": "2,1"}, ["--actors: need MIN <= MAX, got 2,1"]),
        ("infer", {"actor-memory": "lots"},
         ["--spec", "actor-memory: expected a size"]),
        ("infer", {"task": "embed"}, ["--model: required"]),
        ("optimize", {"model": "m", "output": "o"}, ["--recipe: required"]),
        ("serve", {"model": "m"}, ["--task: required: embed, score, classify"]),
        ("infer", {"model": "m", "input": "i", "output": "o"},
         ["--task: required: embed, score, classify, generate"]),
    ],
)  # fmt: skip
def test_a_mistake_in_a_spec_file_is_one_line(command, values, fragments, tmp_path):
    spec = write_spec(tmp_path / "job.yaml", **values)
    assert_user_error(invoke(command, "--spec", spec), *fragments)


def test_a_spec_file_that_is_not_a_mapping_of_flags(tmp_path):
    (tmp_path / "list.yaml").write_text("- embed\n")
    (tmp_path / "broken.yaml").write_text("model: [\n")
    cases = [
        ("list.yaml", "must map flags to values"),
        ("broken.yaml", "is not valid YAML at line 2"),
        ("missing.yaml", "no such file"),
    ]
    for name, fragment in cases:
        result = invoke("infer", "--spec", str(tmp_path / name))
        assert_user_error(result, "--spec", fragment)


def test_an_input_that_follows_no_input_flag_is_named(tmp_path):
    spec = write_spec(tmp_path / "job.yaml", task="embed")
    assert_user_error(
        invoke("infer", "--spec", spec, "extra.parquet"),
        "--input: extra.parquet follows no --input",
    )
