"""A row the model computes as NaN or inf is a ``not_finite`` error, not NaN written.

The models here hold one word, "oil", at 1e5 in their input embeddings: fine in fp32
and bf16, inf once loaded in fp16 (whose largest value is 65,504), as a real model's
activations overflow fp16 in some layers. A row without the word stays as it is.
"""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import run_job
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from lmbatch.actors.model_info import ModelSpec, inspect_model
from lmbatch.actors.predict import PredictorConfig
from lmbatch.actors.predictor import Predictor
from lmbatch.actors.tokenize import TokenizeConfig, actor_batch, with_backend

TEXTS = ["the water is long", "oil is the word", "they could see the oil", "a day"]
WITH_OIL = [False, True, True, False]
TASKS = {"embed": "bert", "classify": "bert_cls", "score": "llama", "generate": "llama"}
VALUES = {
    "embed": "embedding",
    "classify": "probs",
    "score": "logprob",
    "generate": "generated_text",
}
FP16_ERROR = (
    "not_finite: the model computed NaN or inf in fp16; fp16 overflows in some "
    "models: --precision bf16 or fp32 keeps the range"
)


LOADERS = {
    "bert": AutoModel,
    "bert_cls": AutoModelForSequenceClassification,
    "llama": AutoModelForCausalLM,
}


@pytest.fixture(scope="module")
def overflowing(tiny_models, tmp_path_factory) -> dict[str, str]:
    """name -> a copy of that tiny model whose "oil" embedding is 1e5."""
    out = {}
    for name, loader in LOADERS.items():
        path = tmp_path_factory.mktemp(f"overflow-{name}")
        shutil.copytree(tiny_models[name], path, dirs_exist_ok=True)
        model = loader.from_pretrained(path)
        oil = AutoTokenizer.from_pretrained(path).convert_tokens_to_ids("oil")
        with torch.no_grad():
            model.get_input_embeddings().weight[oil] = 1e5
        model.save_pretrained(path)
        out[name] = str(path)
    return out


def run_actor(path: str, task: str, precision: str, chunk: bool = False, **kw):
    """The actor's output table for TEXTS; with ``chunk``, in windows of 2 words."""
    length = 4 if chunk else 16
    info = inspect_model(path, task)
    config = PredictorConfig(ModelSpec(path, task, precision), info, max_length=length,
                             max_new_tokens=4, chunk=chunk, **kw)  # fmt: skip
    tokens = TokenizeConfig(path, length, "chunk" if chunk else "truncate")
    return Predictor(config)(actor_batch(TEXTS, with_backend(tokens)))


@pytest.mark.parametrize("task", list(TASKS))
def test_a_row_that_overflows_fp16_is_an_error_and_fp32_keeps_it(overflowing, task):
    path = overflowing[TASKS[task]]
    column = VALUES[task]
    out = run_actor(path, task, "fp16")
    assert out["error"].to_pylist() == [FP16_ERROR if oil else None for oil in WITH_OIL]
    values = out[column].to_pylist()
    assert [v is None for v in values] == WITH_OIL  # nothing written for them
    if task != "generate":
        assert np.isfinite(np.array([v for v in values if v is not None])).all()
    for precision in ("fp32", "bf16"):
        kept = run_actor(path, task, precision)
        assert kept["error"].null_count == len(TEXTS), (precision, kept["error"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp16", "int8", "nf4"])
@pytest.mark.parametrize("task", list(TASKS))
def test_on_cuda_the_check_runs_on_the_device(overflowing, task, precision):
    """bitsandbytes computes in fp16 on a GPU: its embeddings overflow as fp16's."""
    from lmbatch.actors.predictor import not_finite_error

    path = overflowing[TASKS[task]]
    out = run_actor(path, task, precision, device="cuda")
    error = not_finite_error(precision, "cuda")
    assert out["error"].to_pylist() == [error if oil else None for oil in WITH_OIL]
    kept = run_actor(path, task, "bf16", device="cuda")
    assert kept["error"].null_count == len(TEXTS), kept["error"]


def test_a_chunked_row_fails_whole_where_one_window_overflows(overflowing):
    # Windows of 2 words: "they could see the oil" has "oil" in its third only.
    out = run_actor(overflowing["bert"], "embed", "fp16", chunk=True)
    assert out["error"].to_pylist() == [FP16_ERROR if oil else None for oil in WITH_OIL]
    assert out["windows"].to_pylist()[2] is None
    assert out["windows"].to_pylist()[0] == 2


def test_outside_fp16_the_error_gives_no_precision_hint():
    from lmbatch.actors.predictor import not_finite_error

    assert not_finite_error("fp32", "cpu") == (
        "not_finite: the model computed NaN or inf in fp32"
    )
    assert not_finite_error("nf4", "cpu").endswith("in nf4")  # computes in fp32 there
    assert not_finite_error("nf4", "cuda").endswith("keeps the range")


@pytest.mark.parametrize(
    ("precision", "device", "hinted"),
    [("fp16", "cpu", True), ("int8", "cuda (NVIDIA H200)", True),
     ("int8", "cpu", False), ("fp32", "cuda (NVIDIA H200)", False)],
)  # fmt: skip
def test_the_summary_gives_the_fp16_hint_only_where_fp16_ran(precision, device, hinted):
    from lmbatch.jobs.summary import Summary

    actor = {"precision": precision, "device": device}
    summary = Summary(4, 0, 1.0, 0.0, 0.0, {"not_finite": 3}, actors=[actor])
    (line,) = summary._overflowed()
    assert line.startswith("not_finite: 3 rows came out NaN or inf")
    assert line.endswith("keeps the range") == hinted, line


@pytest.mark.usefixtures("ray_local")
def test_a_job_counts_the_rows_that_overflowed(overflowing, tmp_path):
    source = tmp_path / "rows.parquet"
    texts = TEXTS * 10
    pq.write_table(pa.table({"k": [str(i) for i in range(40)], "text": texts}), source)
    rows, summary = run_job(tmp_path / "out", model=overflowing["bert"],
                            inputs=str(source), task="embed", id_column="k",
                            precision="fp16")  # fmt: skip
    assert len(rows) == summary.rows == 40
    assert summary.errors == {"not_finite": 20}
    assert all(
        (rows[str(i)]["error"] == FP16_ERROR) == WITH_OIL[i % 4] for i in range(40)
    )
    assert all(rows[str(i)]["embedding"] is None for i in range(1, 40, 4))
    assert "not_finite: 20 rows came out NaN or inf" in "\n".join(summary.lines())
