"""``lmbatch optimize`` end to end on the session's Ray; its artifact in ``infer``."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import sentences
from helpers import run_job
from ray_head import LMBATCH
from test_cli_errors import assert_user_error

from lmbatch.actors.model_info import inspect_model
from lmbatch.jobs.cli import cli

RECIPE = """\
steps:
  - prune: {method: structured, heads: 0.5, ffn: 0.25}
  - distill: {steps: 5, batch_size: 16}
  - lowrank: {rank_ratio: 0.25, min_saving: 0.0, skip: ["*attention*"]}
  - quantize: {method: cpu-int8, activations: static}
"""


def optimize(*args: str):
    return CliRunner().invoke(cli, ["optimize", *args])


@pytest.fixture
def recipe(tmp_path) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return str(path)


def test_optimize_writes_a_measured_artifact_that_infer_loads(
    ray_local, tiny_models, corpus, recipe, tmp_path
):
    out = tmp_path / "artifact"
    done = optimize(
        "--model",
        tiny_models["bert_st"],
        "--recipe",
        recipe,
        "--calibration",
        corpus["parquet"],
        "--output",
        str(out),
    )
    assert done.exit_code == 0, done.output
    assert "4. quantize" in done.output
    meta = json.loads((out / "lmbatch.json").read_text())
    names = [s["name"] for s in meta["steps"]]
    assert names == ["original", "1. prune", "2. distill", "3. lowrank", "4. quantize"]
    for step in meta["steps"]:
        assert {
            "cosine",
            "min_cosine",
            "top10",
            "parameters",
            "bytes",
            "rows_per_s",
        } <= step["metrics"].keys()
    assert (
        meta["steps"][1]["metrics"]["parameters"]
        < meta["steps"][0]["metrics"]["parameters"]
    )
    assert meta["precision"] == "mixed" and meta["task"] == "embed"
    assert [next(iter(s)) for s in meta["recipe"]] == [
        "prune",
        "distill",
        "lowrank",
        "quantize",
    ]
    assert (out / "report.md").read_text().count("\n| ") == 6  # header + 5 rows
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "modules.json").is_file()  # sentence-transformers pooling kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact", "recipe.yaml"]

    rows, summary = run_job(
        tmp_path / "emb", model=str(out), inputs=corpus["parquet"], task="embed"
    )
    assert summary.rows == 120 and not summary.errors
    assert len(next(iter(rows.values()))["embedding"]) == 32
    # The base's sentence-transformers pooling (CLS, not normalised) came along.
    base = inspect_model(tiny_models["bert_st"], "embed").sentence
    assert inspect_model(str(out), "embed").sentence == base
    assert base.modes == ("cls",) and "normalize" not in base.steps


def test_optimize_causal_lm_reports_perplexity(
    ray_local, tiny_models, corpus, tmp_path
):
    recipe = tmp_path / "lm.yaml"
    recipe.write_text(
        "steps:\n  - prune: {method: activation, sparsity: 0.5, "
        "pattern: '2:4', storage: bitmask}\n"
    )
    out = tmp_path / "lm"
    done = optimize(
        "--model",
        tiny_models["llama"],
        "--recipe",
        str(recipe),
        "--calibration",
        corpus["jsonl"],
        "--eval",
        corpus["csv"],
        "--output",
        str(out),
    )
    assert done.exit_code == 0, done.output
    metrics = json.loads((out / "lmbatch.json").read_text())["steps"][-1]["metrics"]
    assert {"perplexity", "perplexity_increase", "kl", "top1_agreement"} <= set(metrics)
    report = (out / "report.md").read_text()
    assert "same speed on dense kernels" in report
    _, summary = run_job(
        tmp_path / "scores", model=str(out), inputs=corpus["parquet"], task="score"
    )
    assert summary.rows == 120 and not summary.errors


def test_optimize_user_errors(tiny_models, corpus, recipe, tmp_path):
    base = ["--model", tiny_models["bert"], "--output", str(tmp_path / "o")]
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - prune: {method: magnitude, sparsity: 2}\n")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep me")
    into_taken = [
        "--model", tiny_models["bert"], "--recipe", recipe,
        "--calibration", corpus["parquet"], "--output", str(taken),
    ]  # fmt: skip
    cases = [
        (
            [*base, "--recipe", str(bad), "--calibration", corpus["parquet"]],
            "steps[0].prune.sparsity",
        ),
        ([*base, "--recipe", recipe], "--calibration"),
        (
            [
                *base,
                "--recipe",
                recipe,
                "--calibration",
                corpus["parquet"],
                "--text-column",
                "body",
            ],
            "--text-column: no column 'body'",
        ),
        (
            [
                "--model",
                str(tmp_path),
                "--recipe",
                recipe,
                "--calibration",
                corpus["parquet"],
                "--output",
                str(tmp_path / "o"),
            ],
            "--model",
        ),
        (into_taken, "--overwrite"),
        ([*into_taken, "--overwrite"], f"{taken} holds files no lmbatch job wrote (x)"),
    ]
    student = pickled_embedder(tiny_models, tmp_path / "student")
    distill = tmp_path / "distill.yaml"
    distill.write_text(f"steps:\n  - distill: {{student: {student}}}\n")
    for args, fragment in cases:
        assert_user_error(optimize(*args), fragment)
    args = [*base, "--recipe", str(distill), "--calibration", corpus["parquet"]]
    assert_user_error(
        optimize(*args), "steps[0].distill.student: ", "pass --allow-pickle"
    )
    quantised = tmp_path / "nf4"  # a checkpoint bitsandbytes stored: no gradients
    shutil.copytree(tiny_models["bert"], quantised)
    config = json.loads((quantised / "config.json").read_text())
    nf4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    config["quantization_config"] = {"quant_method": "bitsandbytes", **nf4}
    (quantised / "config.json").write_text(json.dumps(config))
    args = ["--model", str(quantised), "--output", str(tmp_path / "o"),
            "--recipe", recipe, "--calibration", corpus["parquet"]]  # fmt: skip
    assert_user_error(
        optimize(*args), "--model: ", "holds its weights in nf4 (bitsandbytes)"
    )
    distill.write_text(f"steps:\n  - distill: {{student: {quantised}}}\n")
    args = [*base, "--recipe", str(distill), "--calibration", corpus["parquet"]]
    assert_user_error(
        optimize(*args), "steps[0].distill.student: ", "in nf4 (bitsandbytes)"
    )
    other = tmp_path / "other-model.yaml"  # written for a 32-block model
    other.write_text(
        "steps:\n  - prune: {method: magnitude, skip: ['*pooler*']}\n"
        "  - quantize: {method: cpu-int8, skip: ['*layers.31.mlp*']}\n"
    )
    args = [*base, "--recipe", str(other), "--calibration", corpus["parquet"]]
    assert_user_error(
        optimize(*args),
        "steps[1].quantize.skip: '*layers.31.mlp*' matches no layer of this model "
        "(its 13 Linears are named like 'encoder.layer.0.attention.self.query' ... "
        "'pooler.dense')",
    )
    everything = tmp_path / "skips-all.yaml"  # a step left nothing to change
    everything.write_text("steps:\n  - prune: {method: magnitude, skip: ['*']}\n")
    args = [*base, "--recipe", str(everything), "--calibration", corpus["parquet"]]
    assert_user_error(
        optimize(*args),
        "steps[0].prune.skip: leaves the step no layer to change "
        "(the heads are kept anyway)",
    )
    calibrated = [*base, "--calibration", corpus["parquet"]]
    cross = ["--model", tiny_models["bert_cls"], "--output", str(tmp_path / "o")]
    assert_user_error(
        optimize(*cross, "--recipe", recipe, "--calibration", corpus["parquet"],
                 "--pair-column", "text"),
        "--pair-column: 'text' is --text-column too",
    )  # fmt: skip
    assert_user_error(  # the tiny models have 64 positions
        optimize(*calibrated, "--recipe", recipe, "--max-length", "65"),
        "--max-length: 65 is more than the model's 64 positions",
    )
    kl = tmp_path / "kl.yaml"  # an embedding model: no logits to compare
    kl.write_text("steps:\n  - distill: {steps: 2, loss: kl}\n")
    assert_user_error(
        optimize(*calibrated, "--recipe", str(kl)),
        "steps[0].distill.loss: kl compares logits; an embedding model's loss is "
        "cosine",
    )
    few = tmp_path / "one-row.parquet"
    pq.write_table(pa.table({"text": ["a lone text"]}), few)
    assert_user_error(
        optimize(*base, "--recipe", recipe, "--calibration", str(few)),
        "--calibration: 1 row of text: too few to hold 16 out for evaluation and "
        "calibrate on the rest; give at least 32, or pass --eval",
    )
    long_rows = tmp_path / "long-rows.yaml"
    long_rows.write_text("steps:\n  - distill: {steps: 2, max_length: 100}\n")
    assert_user_error(
        optimize(*calibrated, "--recipe", str(long_rows)),
        "steps[0].distill.max_length: 100 is more than the model's 64 positions",
    )
    search = tmp_path / "search.yaml"
    search.write_text("steps:\n  - search: {floor: {cosine: 0.99}}\n")
    classify = [
        "--model",
        tiny_models["bert_cls"],
        "--output",
        str(tmp_path / "o"),
        "--recipe",
        str(search),
        "--calibration",
        corpus["parquet"],
    ]
    assert_user_error(
        optimize(*classify),
        "steps[0].search.floor.cosine: not measured for this model (--task "
        "classify): agreement",
    )
    assert (taken / "x").read_text() == "keep me"
    assert not Path(tmp_path / "o").exists()


def test_default_row_lengths_are_cut_to_the_models_positions(
    ray_local, tiny_models, tmp_path
):
    """--max-length's and distill's default of 128 tokens, on a model of 64
    positions and texts longer than that: rows are cut to 64, not an IndexError
    from GPT-2's position table."""
    texts = [" ".join([t] * 4) for t in sentences(80, max_words=30)]
    calibration = tmp_path / "long.parquet"
    pq.write_table(pa.table({"text": texts}), calibration)
    recipe = tmp_path / "distill.yaml"
    recipe.write_text("steps:\n  - distill: {steps: 2}\n")
    done = optimize(
        "--model", tiny_models["gpt2"], "--recipe", str(recipe),
        "--calibration", str(calibration), "--output", str(tmp_path / "o"),
    )  # fmt: skip
    assert done.exit_code == 0, done.output


def pickled_embedder(tiny_models, path: Path) -> str:
    """An older sentence-transformers model: the transformer's weights and its Dense
    module's (32 -> 16, tanh) both kept as pytorch_model.bin."""
    import sentence_transformers.models as st
    import torch
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    modules = [st.Transformer(tiny_models["bert"]), st.Pooling(32, "mean"),
               st.Dense(32, 16, activation_function=torch.nn.Tanh())]  # fmt: skip
    SentenceTransformer(modules=modules).save(str(path))
    for weights in [path / "model.safetensors", *path.glob("*/model.safetensors")]:
        torch.save(load_file(weights), weights.parent / "pytorch_model.bin")
        weights.unlink()
    return str(path)


def test_optimize_a_model_kept_as_pickles_with_allow_pickle(
    ray_local, tiny_models, corpus, tmp_path
):
    """--allow-pickle trusts the base's *.bin (tensors only); the artifact holds
    safetensors only, so infer loads it without the flag."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    base = pickled_embedder(tiny_models, tmp_path / "older")
    recipe = tmp_path / "int8.yaml"
    recipe.write_text("steps:\n  - quantize: {method: cpu-int8}\n")
    out = tmp_path / "artifact"
    args = ["--model", base, "--recipe", str(recipe),
            "--calibration", corpus["parquet"], "--output", str(out)]  # fmt: skip
    assert_user_error(optimize(*args), "--model", "pass --allow-pickle")
    done = optimize(*args, "--allow-pickle")
    assert done.exit_code == 0, done.output
    assert (
        not list(out.rglob("*.bin")) and (out / "2_Dense/model.safetensors").is_file()
    )
    original = json.loads((out / "lmbatch.json").read_text())["steps"][0]
    assert original["metrics"]["cosine"] == pytest.approx(1.0)
    rows, summary = run_job(tmp_path / "emb", model=str(out), inputs=corpus["parquet"],
                            task="embed", id_column="doc")  # fmt: skip
    assert summary.rows == 120 and not summary.errors
    got = np.array([rows[f"doc-{i:03d}"]["embedding"] for i in range(120)])
    want = SentenceTransformer(base, device="cpu").encode(corpus["texts"])
    assert got.shape == want.shape == (120, 16)  # the Dense module came along
    cosine = (
        (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    )
    assert cosine.min() > 0.99


def test_optimize_a_model_with_its_own_code_with_trust_remote_code(
    ray_local, tiny_models, corpus, tmp_path
):
    """A model whose architecture is its own code (auto_map): optimize runs it only
    with --trust-remote-code, and the artifact keeps the code, so that infer, with
    the same flag, rebuilds it (a cpu-int8 artifact is rebuilt from its config)."""
    import numpy as np

    base = tmp_path / "own-code"
    shutil.copytree(tiny_models["oom_600"], base)  # a BERT subclass, as remote code
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "oom_above_tokens": 10**9}))
    recipe = tmp_path / "int8.yaml"
    recipe.write_text("steps:\n  - quantize: {method: cpu-int8}\n")
    out = tmp_path / "artifact"
    args = ["--model", str(base), "--recipe", str(recipe),
            "--calibration", corpus["parquet"], "--output", str(out)]  # fmt: skip
    assert_user_error(optimize(*args), "--trust-remote-code: ", "own model code")
    done = optimize(*args, "--trust-remote-code")
    assert done.exit_code == 0, done.output
    assert (out / "oom_model.py").is_file()
    flags = dict(inputs=corpus["parquet"], task="embed", id_column="doc",
                 trust_remote_code=True)  # fmt: skip
    got, summary = run_job(tmp_path / "int8", model=str(out), **flags)
    assert summary.rows == 120 and not summary.errors
    want, _ = run_job(tmp_path / "base", model=str(base), **flags)
    a = np.array([got[k]["embedding"] for k in sorted(want)])
    b = np.array([want[k]["embedding"] for k in sorted(want)])
    assert (a * b).sum(1).min() > 0.99  # unit vectors: their cosines


def test_optimize_a_cross_encoder_on_text_pairs(
    ray_local, tiny_models, corpus, tmp_path
):
    """--pair-column: an NLI model calibrated, measured and then run on (premise,
    hypothesis) pairs, as infer's --pair-column and the pipeline's text_pair read
    them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import sentences
    from helpers import wide_classifier
    from transformers import pipeline

    model = wide_classifier(tiny_models, tmp_path / "nli", 3)
    rows = 48
    table = pa.table({"premise": sentences(rows, seed=7, max_words=30),
                      "hypothesis": sentences(rows, seed=8, max_words=8),
                      "key": [f"r{i}" for i in range(rows)]})  # fmt: skip
    pq.write_table(table, tmp_path / "nli.parquet")
    recipe = tmp_path / "bf16.yaml"
    recipe.write_text("steps:\n  - quantize: {method: bf16}\n")
    out = tmp_path / "artifact"
    data = str(tmp_path / "nli.parquet")
    args = ["--model", model, "--recipe", str(recipe), "--text-column", "premise",
            "--calibration", data, "--output", str(out)]  # fmt: skip
    from lmbatch.jobs.optimize import prepare_optimize
    from lmbatch.jobs.spec import OptimizeSpec

    spec = OptimizeSpec(model=model, recipe=str(recipe), text_column="premise",
                        pair_column="hypothesis", calibration=(data,),
                        output=str(out))  # fmt: skip
    texts = prepare_optimize(spec).texts  # what the recipe's batches are made of
    first = (table["premise"][0].as_py(), table["hypothesis"][0].as_py())
    assert texts.calibration[0] == first and len(texts.evaluation[0]) == 2
    done = optimize(*args, "--pair-column", "hypothesis")
    assert done.exit_code == 0, done.output
    steps = json.loads((out / "lmbatch.json").read_text())["steps"]
    assert steps[0]["metrics"]["agreement"] == pytest.approx(1.0)
    assert steps[1]["metrics"]["agreement"] >= 0.9
    got, summary = run_job(tmp_path / "labels", model=str(out), task="classify",
                           inputs=data, id_column="key",
                           text_column="premise", pair_column="hypothesis")  # fmt: skip
    assert summary.rows == rows and not summary.errors
    nli = pipeline("text-classification", model=model, top_k=None)
    pairs = zip(table["premise"].to_pylist(), table["hypothesis"].to_pylist(),
                strict=True)  # fmt: skip
    given = [{"text": p, "text_pair": h} for p, h in pairs]
    want = [max(s, key=lambda d: d["score"])["label"] for s in nli(given)]
    same = sum(got[f"r{i}"]["label"] == want[i] for i in range(rows))
    assert same >= 0.9 * rows
    embed = ["--model", tiny_models["bert"], "--recipe", str(recipe),
             "--calibration", corpus["parquet"], "--output", str(tmp_path / "e"),
             "--pair-column", "text"]  # fmt: skip
    assert_user_error(optimize(*embed), "--pair-column", "--task classify")


def test_ctrl_c_leaves_no_step_snapshots(tiny_models, corpus, tmp_path):
    """The task dies with Ray mid-step, before its own cleanup: the driver's runs."""
    recipe = tmp_path / "long.yaml"
    recipe.write_text(
        "steps:\n  - prune: {method: magnitude, sparsity: 0.5}\n"
        "  - distill: {steps: 100000}\n"
    )
    out = tmp_path / "artifact"
    args = [
        str(LMBATCH), "optimize", "--model", tiny_models["bert"], "--recipe",
        str(recipe), "--calibration", corpus["parquet"], "--output", str(out),
    ]  # fmt: skip
    driver = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    snapshot = tmp_path / ".artifact.steps" / "0-prune"
    deadline = time.monotonic() + 240
    while not (snapshot / "lmbatch.json").is_file():  # distilling now
        assert driver.poll() is None, driver.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the prune step never ended"
        time.sleep(0.2)
    # The task's process is busy in a long kernel: it cannot run its own cleanup
    # before Ray kills it (held stopped here, so that it never does).
    (task,) = [
        p for p in psutil.Process(driver.pid).children(recursive=True)
        if _title(p).startswith("ray::_run")
    ]  # fmt: skip
    task.suspend()
    driver.send_signal(signal.SIGINT)
    try:
        _, err = driver.communicate(timeout=120)
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            task.kill()  # already, unless Ray left it behind
    assert driver.returncode == 130, err[-3000:]
    assert err.decode().strip().splitlines()[-1] == (
        f"interrupted: no artifact was written to {out}"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.yaml"]


def _title(process: psutil.Process) -> str:
    """A process's title (Ray names a task's worker ``ray::FUNCTION``), or "" for one
    gone meanwhile."""
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""
