"""`lmbatch serve`'s endpoint: real HTTP on loopback to a Ray Serve deployment of the
infer job's predictor; answers match the infer job's, requests are batched together,
bad requests get a 400 and one line."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import greedy, run_job, wide_classifier
from ray import serve
from ray_head import LMBATCH, free_port

from lmbatch.errors import UserError
from lmbatch.jobs.serve import deploy, prepare_serve
from lmbatch.jobs.spec import ServeSpec

TEXTS = ["the water is long", "a", "one day they could see the oil", "he was here"]


@pytest.fixture(scope="module")
def endpoint(ray_local, tiny_models, tmp_path_factory):
    """(url, the infer job's rows for TEXTS): the job runs first, on a free Ray."""
    root = tmp_path_factory.mktemp("serve")
    pq.write_table(
        pa.table({"doc": ["0", "1", "2", "3"], "text": TEXTS}), root / "t.pq"
    )
    rows, _ = run_job(
        root / "out", model=tiny_models["bert"], inputs=str(root / "t.pq"),
        task="embed", id_column="doc",
    )  # fmt: skip
    spec = ServeSpec(
        model=tiny_models["bert"], task="embed", port=free_port(),
        max_batch_size=8, batch_wait_ms=100,
    )  # fmt: skip
    url = deploy(prepare_serve(spec), threads=1)
    yield url, [rows[str(i)] for i in range(len(TEXTS))]
    serve.shutdown()


def post(url: str, body: bytes | dict | list | None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body)
        except ValueError:  # not ours: Serve's proxy before the app is up, say
            return e.code, {"error": body.decode(errors="replace")}


def test_answers_match_the_infer_job(endpoint):
    url, expected = endpoint
    status, body = post(url, {"inputs": TEXTS})
    assert status == 200 and len(body["results"]) == len(TEXTS)
    for got, want in zip(body["results"], expected, strict=True):
        assert got["error"] is None
        assert got["embedding"] == pytest.approx(list(want["embedding"]), abs=1e-5)
    status, body = post(url, {"inputs": TEXTS[0]})  # one text, not in a list
    assert status == 200 and len(body["results"]) == 1
    want = list(expected[0]["embedding"])
    assert body["results"][0]["embedding"] == pytest.approx(want, abs=1e-5)


def test_concurrent_requests_are_batched_together(endpoint):
    url, expected = endpoint
    before = json.loads(urllib.request.urlopen(url + "stats", timeout=30).read())
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda t: post(url, {"inputs": [t]}), TEXTS * 4))
    assert all(status == 200 for status, _ in answers)
    for (_, body), want in zip(answers, expected * 4, strict=True):
        assert body["results"][0]["embedding"] == pytest.approx(
            list(want["embedding"]), abs=1e-5
        )
    after = json.loads(urllib.request.urlopen(url + "stats", timeout=30).read())
    assert after["texts"] - before["texts"] == 16
    assert after["batches"] - before["batches"] < 16, "some requests shared a batch"
    assert after["largest_batch"] > 1


@pytest.mark.parametrize(
    "body, says",
    [
        (b"{not json", "not JSON"),
        ({"text": "one"}, "no 'inputs' field; expected a JSON object"),
        (["one"], "the body is a list; expected a JSON object"),
        (None, "the body is null"),
        ({"inputs": []}, "non-empty list"),
        ({"inputs": ["one", 3]}, "inputs[1] is a number, not a string"),
        ({"inputs": [{"text": "one"}]}, "inputs[0] is an object, not a string"),
        ({"inputs": [["one", "two"]]}, "inputs[0] is a list, not a string"),
        ({"inputs": ["one"], "extra": 1}, "unknown field 'extra'"),
    ],
)
def test_bad_requests_get_400_and_one_line(endpoint, body, says):
    status, answer = post(endpoint[0], body)
    assert status == 400 and says in answer["error"] and "\n" not in answer["error"]


def test_a_bad_text_gets_its_error_not_a_failed_request(endpoint):
    status, body = post(endpoint[0], {"inputs": ["one", "  ", "one " * 1000]})
    assert status == 200
    assert body["results"][0]["error"] is None
    assert body["results"][1]["error"].startswith("empty_text")
    # A text cut to --max-length says so; an error row was not cut, nor computed.
    cut = [r["truncated"] for r in body["results"]]
    assert cut == [False, None, True]


def test_a_path_it_does_not_serve_is_404_not_a_prediction(endpoint):
    status, answer = post(endpoint[0] + "stat", {"inputs": ["one"]})
    assert status == 404 and answer == {
        "error": "no such path /stat; POST / or GET /stats"
    }


def test_get_is_refused_with_405(endpoint):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(endpoint[0], timeout=30)
    assert e.value.code == 405


def test_bound_to_loopback_only(endpoint):
    port = int(endpoint[0].rsplit(":", 1)[1].strip("/"))
    others = [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]
    if not others:
        pytest.skip("this machine has no non-loopback IPv4 address")
    with pytest.raises(OSError), socket.create_connection((others[0], port), 5):
        pass


@pytest.mark.parametrize(
    "flags, where",
    [
        ({"task": "translate"}, "--task"),
        ({"task": "generate", "max_new_tokens": 0}, "--max-new-tokens"),
        ({"port": 70000}, "--port"),
        ({"max_batch_size": 0}, "--max-batch-size"),
        ({"precision": "fp8"}, "--precision"),
        ({"max_length": 2}, "--max-length"),  # the tokenizer's: no room for a text
    ],
)
def test_bad_flags_are_named(tiny_models, flags, where):
    with pytest.raises(UserError) as e:
        prepare_serve(
            ServeSpec.from_flags(
                **{"model": tiny_models["bert"], "task": "embed", **flags}
            )
        )
    assert e.value.where == where


def test_an_address_this_machine_cannot_listen_on_is_one_line(tiny_models):
    """Checked before Ray starts: Serve's proxy would bind it only once Ray and the
    replicas were up, and fail with a traceback."""
    from click.testing import CliRunner

    from lmbatch.jobs.cli import cli

    base = ["serve", "--model", tiny_models["bert"], "--task", "embed"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = CliRunner().invoke(cli, [*base, "--port", str(port)])
    assert done.exit_code != 0 and "Traceback" not in done.output
    assert done.output.strip() == (
        f"Error: --port: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    done = CliRunner().invoke(cli, [*base, "--host", "203.0.113.9"])  # TEST-NET-3
    assert done.output.startswith("Error: --host: cannot listen on 203.0.113.9:")


def continuations(path: str, texts: list[str], new_tokens: int) -> list[str]:
    """Each text's greedy continuation by transformers itself, alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = (tok(text, return_tensors="pt")["input_ids"] for text in texts)
    return [tok.decode(greedy(model, tok, i, new_tokens), skip_special_tokens=True)
            for i in ids]  # fmt: skip


def pipeline_probs(path: str, inputs: list) -> list[list[float]]:
    """Each input's scores by transformers' text-classification pipeline, a text
    pair given as its ``text_pair``, in the model's label order."""
    from transformers import AutoConfig, pipeline

    labels = AutoConfig.from_pretrained(path).id2label
    given = [t if isinstance(t, str) else {"text": t[0], "text_pair": t[1]}
             for t in inputs]  # fmt: skip
    out = pipeline("text-classification", model=path, top_k=None)(given)
    return [[{d["label"]: d["score"] for d in scores}[labels[i]]
             for i in range(len(labels))] for scores in out]  # fmt: skip


@contextmanager
def serving(*flags: str) -> Iterator[str]:
    """``lmbatch serve`` with these flags, in a process of its own: its URL once it
    is up; stopped by Ctrl-C (SIGINT to its pid), which must end it cleanly."""
    port = free_port()
    process = subprocess.Popen(
        [str(LMBATCH), "serve", *flags, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/"
        # It prints its address once the endpoint is up (a blocking readline: the
        # test's own timeout bounds it).
        lines = [process.stdout.readline()]
        while f"at {url}" not in lines[-1]:
            assert lines[-1] or process.poll() is None, process.stderr.read()[-3000:]
            lines.append(process.stdout.readline())
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            out, err = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()  # by its pid
            out, err = process.communicate()
            pytest.fail(f"still running 120 s after SIGINT: {out[-500:]}{err[-2000:]}")
    assert process.returncode == 0, err[-3000:]
    assert "stopping" in out


@pytest.mark.parametrize("task", ["classify", "generate"])
def test_lmbatch_serve_command_serves_until_ctrl_c(tiny_models, task, tmp_path):
    model = tiny_models["gpt2"]
    flags = ["--model", model, "--task", task, "--max-new-tokens", "4"]
    if task == "classify":
        model = wide_classifier(tiny_models, tmp_path / "nli", labels=3)
        flags = ["--model", model, "--task", task]
    with serving(*flags) as url:
        status, body = post(url, {"inputs": TEXTS})
        assert status == 200, body
        results = body["results"]
        if task == "classify":
            assert {r["label"] for r in results} <= {"neg", "neutral", "pos"}
            # Texts and text pairs in one request: each scored as the pipeline does.
            mixed = [TEXTS[0], [TEXTS[2], TEXTS[3]], TEXTS[1], [TEXTS[3], TEXTS[0]]]
            status, body = post(url, {"inputs": mixed})
            assert status == 200, body
            got = [r["probs"] for r in body["results"]]
            for row, want in zip(got, pipeline_probs(model, mixed), strict=True):
                assert row == pytest.approx(want, abs=1e-5)
            assert got[0] != pytest.approx(got[1], abs=1e-4)
        else:  # batched with left padding, as each text alone
            want = continuations(model, TEXTS, 4)
            assert any(want), want  # real continuations, not all empty
            assert [r["generated_text"] for r in results] == want
            # No row of this model ends early: each ran its 4 tokens.
            assert {(r["finish_reason"], r["generated_tokens"]) for r in results} == {
                ("length", 4)
            }
            status, body = post(url, {"inputs": TEXTS, "seed": 1})
            assert status == 400 and "does not sample" in body["error"]
        assert all(r["error"] is None for r in results)


@pytest.mark.usefixtures("ray_local")
def test_replicas_reserve_no_gpu_without_one_and_refuse_cuda(tiny_models):
    from lmbatch.jobs.serve import replica_resources

    spec = ServeSpec(model=tiny_models["bert"], task="embed")
    assert replica_resources(prepare_serve(spec)) == ("cpu", {"num_cpus": 1})
    cuda = ServeSpec(model=tiny_models["bert"], task="embed", device="cuda")
    with pytest.raises(UserError, match="--device: cuda asked for"):
        replica_resources(prepare_serve(cuda))
