"""Jobs submitted through the CLI to a real Ray head (``ray start --head``, token auth
on), followed, listed, stopped; and refused with one clear line without the token."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pyarrow.parquet as pq
import pytest
from ray_head import LMBATCH, start_head

from lmbatch.errors import UserError
from lmbatch.jobs.spec import InferSpec
from lmbatch.jobs.submit import cluster_paths, is_loopback

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    started = start_head(tmp_path_factory.mktemp("cluster"))
    yield started
    started.stop()


def lmbatch(head, *args: str, token: bool = True, timeout: int = 300):
    return subprocess.run(
        [str(LMBATCH), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=head.client_env(token),
    )


def job_id(stdout: str) -> str:
    return re.search(r"submitted \w+ job (\S+)", stdout).group(1)


def test_infer_job_runs_on_the_cluster(head, tiny_models, corpus, tmp_path):
    # The module's head is new, and this its first test: it has no job yet.
    listed = lmbatch(head, "jobs", "list", "--address", head.address)
    assert listed.stdout == f"no jobs on {head.address}\n", listed.stderr[-3000:]
    out = tmp_path / "out"
    done = lmbatch(
        head,
        "infer",
        "--model", tiny_models["gpt2"], "--task", "score",
        "--input", corpus["parquet"], "--id-column", "doc",
        "--output", str(out), "--address", head.address,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "rows 120" in done.stdout and "SUCCEEDED" in done.stdout
    ids = pq.read_table(out, columns=["id"])["id"].to_pylist()
    assert sorted(ids) == [f"doc-{i:03d}" for i in range(120)]

    job = job_id(done.stdout)
    status = lmbatch(head, "jobs", "status", job, "--address", head.address)
    assert status.returncode == 0 and f"{job} SUCCEEDED" in status.stdout
    logs = lmbatch(head, "jobs", "logs", job, "--address", head.address)
    assert "rows 120" in logs.stdout and "errors none" in logs.stdout
    listed = lmbatch(head, "jobs", "list", "--address", head.address)
    assert re.search(rf"{job}\s+SUCCEEDED\s+infer", listed.stdout)


def test_a_mistake_on_the_cluster_fails_the_job_with_one_line(
    head, tiny_models, corpus, tmp_path
):
    done = lmbatch(
        head,
        "infer",
        "--model", tiny_models["gpt2"], "--task", "score",
        "--input", corpus["parquet"], "--text-column", "body",
        "--output", str(tmp_path / "out"), "--address", head.address,
    )  # fmt: skip
    assert done.returncode == 1
    assert "Error: --text-column" in done.stdout and "FAILED" in done.stdout
    assert "Traceback" not in done.stdout


def test_stop_ends_a_long_job(head, tiny_models, tmp_path):
    long_input = tmp_path / "long.jsonl"
    long_input.write_text(
        "".join(
            json.dumps({"text": f"the word {i} is one"}) + "\n" for i in range(20000)
        )
    )
    done = lmbatch(
        head,
        "infer",
        "--model", tiny_models["gpt2"], "--task", "generate",
        "--max-new-tokens", "32", "--input", str(long_input),
        "--output", str(tmp_path / "out"), "--address", head.address, "--no-wait",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    job = job_id(done.stdout)
    deadline = time.monotonic() + 120
    while (
        "RUNNING"
        not in lmbatch(head, "jobs", "status", job, "--address", head.address).stdout
    ):
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(1)
    stopped = lmbatch(head, "jobs", "stop", job, "--address", head.address)
    assert stopped.returncode == 0 and f"{job} STOPPED" in stopped.stdout
    status = lmbatch(head, "jobs", "status", job, "--address", head.address)
    assert "STOPPED" in status.stdout


def test_without_the_token_the_cluster_refuses_with_a_clear_line(head, tmp_path):
    done = lmbatch(head, "jobs", "list", "--address", head.address, token=False)
    assert done.returncode == 1
    assert "requires a Ray auth token" in done.stderr
    assert "RAY_AUTH_TOKEN" in done.stderr and "Traceback" not in done.stderr


def test_unknown_job_id_is_named(head):
    done = lmbatch(head, "jobs", "status", "raysubmit_nope", "--address", head.address)
    assert done.returncode == 1 and "no job 'raysubmit_nope'" in done.stderr


def test_non_loopback_without_token_is_refused_before_any_request(tmp_path):
    env_home = tmp_path / "home"
    env_home.mkdir()
    done = subprocess.run(
        [str(LMBATCH), "jobs", "list", "--address", "http://203.0.113.9:8265"],
        capture_output=True,
        text=True,
        env={"HOME": str(env_home), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert done.returncode == 1
    assert "no Ray auth token found" in done.stderr and "--insecure" in done.stderr


def test_a_jobs_command_without_an_address_says_it_needs_one(tmp_path):
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}  # no RAY_ADDRESS either
    done = subprocess.run(
        [str(LMBATCH), "jobs", "list"], capture_output=True, text=True, env=env,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "Error: --address: required: the cluster's dashboard, http://HOST:8265 "
        "(or RAY_ADDRESS)"
    )


def test_submit_only_flags_need_a_cluster_address(tiny_models, corpus, tmp_path):
    done = subprocess.run(
        [
            str(LMBATCH),
            "infer",
            "--model",
            tiny_models["gpt2"],
            "--task",
            "score",
            "--input",
            corpus["parquet"],
            "--output",
            str(tmp_path / "o"),
            "--no-wait",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "--no-wait: applies to a submission" in done.stderr


def test_spec_travels_as_json_and_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = InferSpec(
        model="m", inputs=("a.csv", "s3://b/c.parquet"), task="embed", output="out",
        actors=(1, 2),
    )  # fmt: skip
    assert InferSpec.from_json(spec.model_dump_json()) == spec
    moved = cluster_paths(spec, here=True)
    assert moved.inputs == (str(tmp_path / "a.csv"), "s3://b/c.parquet")
    assert moved.model == str(tmp_path / "m") and moved.output == str(tmp_path / "out")
    # Off this machine, a local path is refused unless said to be on shared storage.
    with pytest.raises(UserError, match="--model: m is a local path"):
        cluster_paths(spec, here=False)
    assert cluster_paths(spec, here=False, shared=True) == moved
    assert is_loopback("http://127.0.0.1:8265") and is_loopback("http://localhost:1")
    assert not is_loopback("http://10.0.0.2:8265")


def test_a_cluster_on_this_machine_takes_local_paths(head, monkeypatch):
    from lmbatch.jobs.submit import connect, runs_here

    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(head.token_path))
    assert runs_here(connect(head.address))


def test_gpus_that_no_node_type_has_are_refused_in_one_line(
    head, tiny_models, corpus, tmp_path
):
    done = lmbatch(
        head,
        "infer", "--model", tiny_models["bert"], "--task", "embed",
        "--input", corpus["parquet"], "--output", str(tmp_path / "o"),
        "--device", "cuda", "--address", head.address,
    )  # fmt: skip
    assert done.returncode == 1
    errors = [line for line in done.stdout.splitlines() if "Error: " in line]
    assert errors == [
        "Error: --device: cuda asked for; the cluster has no GPU, and no node type "
        "of its autoscaler has one"
    ], done.stdout[-2000:]


def test_a_local_path_sent_off_this_machine_is_refused(tiny_models, corpus):
    from click.testing import CliRunner
    from test_cli_errors import assert_user_error

    from lmbatch.jobs.cli import cli

    args = [
        "infer", "--model", tiny_models["bert"], "--task", "embed",
        "--input", corpus["parquet"], "--output", "s3://bucket/out",
        "--address", "http://192.0.2.1:8265",  # TEST-NET: never reached
    ]  # fmt: skip
    done = CliRunner().invoke(cli, args, env={"RAY_AUTH_TOKEN": "unused"})
    assert_user_error(done, "--model", "is a local path", "--shared-paths")
