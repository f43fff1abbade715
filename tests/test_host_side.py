"""The host side of the GPU path, checked on CPU: vectorised padding, contiguous Arrow
outputs, host copies, GPU shares, footprints read off headers, auto precision, device
choice and the separate tokenize stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import sentences
from helpers import actor_rows, run_job

from lmbatch.actors.footprint import GPU_USABLE, model_bytes, smallest_mib
from lmbatch.actors.loading import load_model, resolve_precision
from lmbatch.actors.memory import cuda_free, share_limit
from lmbatch.actors.model_info import ModelSpec, inspect_model
from lmbatch.actors.outputs import Outputs
from lmbatch.actors.padding import TokenRows
from lmbatch.actors.predict import PredictorConfig
from lmbatch.actors.predictor import NO_CUDA, Predictor
from lmbatch.actors.transfer import HostCopy, start_clock, to_device
from lmbatch.errors import UserError

ROWS = pa.array([[5, 6, 7], None, [8], [9, 10, 11, 12], []], pa.list_(pa.int32()))


def naive_pad(rows: list[list[int]], pad: int, side: str):
    width = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        fill = [pad] * (width - len(r))
        ids.append(fill + r if side == "left" else r + fill)
        ones = [1] * len(r)
        zeros = [0] * (width - len(r))
        mask.append(zeros + ones if side == "left" else ones + zeros)
    return np.array(ids), np.array(mask)


@pytest.mark.usefixtures("ray_local")
def test_the_gpu_tests_cpu_reference_gives_a_cpu_jobs_rows(
    tiny_models, corpus, embedded_corpus, tmp_path
):
    """helpers.actor_rows, the rows test_gpu.py compares each CUDA job with: the
    actor's code run in-process gives what a CPU job writes (embed; score in
    windows, the settings a job's tokenize stage takes)."""
    flags = dict(inputs=corpus["parquet"], id_column="doc", precision="fp32",
                 device="cpu")  # fmt: skip
    rows, _ = embedded_corpus
    got = actor_rows(tmp_path / "embed", model=tiny_models["bert"], task="embed",
                     **flags)  # fmt: skip
    assert got.keys() == rows.keys()
    for k in rows:
        np.testing.assert_allclose(got[k]["embedding"], rows[k]["embedding"], atol=1e-6)
    score = dict(model=tiny_models["llama"], task="score", max_length=8,
                 on_long="chunk", **flags)  # fmt: skip
    want, _ = run_job(tmp_path / "score-job", **score)
    got = actor_rows(tmp_path / "score", **score)
    assert got.keys() == want.keys() and any(r["windows"] > 1 for r in got.values())
    for k in want:
        assert got[k]["windows"] == want[k]["windows"]
        assert got[k]["logprob"] == pytest.approx(want[k]["logprob"], rel=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_matches_a_row_by_row_loop(side):
    tokens = TokenRows.from_arrow(pa.chunked_array([ROWS.slice(0, 2), ROWS.slice(2)]))
    assert tokens.lengths.tolist() == [3, 0, 1, 4, 0]
    rows = np.array([3, 0, 2])
    ids, mask = tokens.pad(rows, pad_id=0, side=side)
    want_ids, want_mask = naive_pad([[9, 10, 11, 12], [5, 6, 7], [8]], 0, side)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)
    assert ids.dtype == mask.dtype == np.int64


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_pairs_token_types_are_one_on_its_second_text_only(side):
    # Rows 0 and 3 are pairs whose last 2 and 3 tokens are the second text's.
    pairs = pa.chunked_array([pa.array([2, None, 0, 3, None], pa.int32())])
    tokens = TokenRows.from_arrow(ROWS, pairs)
    ids, mask, types = tokens.pad(np.array([3, 0, 2]), pad_id=0, side=side)
    want = [[0, 1, 1, 1], [0, 1, 1], [0]]  # each row's types, before padding
    _, want_types = naive_pad(want, 0, side)
    _, want_mask = naive_pad([[1] * 4, [1] * 3, [1]], 0, side)
    for row, kinds in enumerate(want):  # naive_pad's mask of ones, laid over
        want_types[row][want_mask[row] == 1] = kinds
    np.testing.assert_array_equal(types, want_types)
    np.testing.assert_array_equal(mask, want_mask)
    assert types.dtype == np.int64 and ids.shape == types.shape


def test_outputs_are_contiguous_fixed_size_lists_with_nulls_for_missing_rows():
    schema = pa.schema(
        [("embedding", pa.list_(pa.float32(), 2)), ("label", pa.string())]
    )
    out = Outputs(schema, 4)
    out.put(
        np.array([2, 0]),
        {
            "embedding": np.array([[1, 2], [3, 4]], np.float32),
            "label": np.array(["b", "a"], dtype=object),
        },
    )
    embedding, label = out.arrays()
    assert embedding.type == pa.list_(pa.float32(), 2)
    assert embedding.to_pylist() == [[3, 4], None, [1, 2], None]
    assert label.to_pylist() == ["a", None, "b", None]
    assert Outputs(schema, 2).arrays()[0].null_count == 2  # nothing ran


def test_host_copy_brings_halves_back_as_float32():
    started = start_clock(torch.device("cpu"))
    tensors = {"x": torch.ones(2, 3, dtype=torch.bfloat16), "n": torch.ones(2)}
    copy = HostCopy(tensors, started)
    host = copy.wait()
    assert host["x"].dtype == np.float32 and host["x"].shape == (2, 3)
    assert copy.seconds >= 0
    (ids,) = to_device((np.arange(3),), torch.device("cpu"))
    assert ids.tolist() == [0, 1, 2]


def test_each_actor_sizes_batches_to_its_share_of_the_gpu():
    gib = 1 << 30
    assert share_limit(80 * gib, 0.125) == int(80 * gib * GPU_USABLE / 8)
    limit = share_limit(80 * gib, 0.125)
    # Another actor holds most of the GPU: the device's free memory bounds us.
    assert cuda_free(device_free=1 * gib, cached=0, held=2 * gib, limit=limit) == gib
    # A mostly free GPU: our share, less what this actor holds, bounds us.
    assert cuda_free(70 * gib, 0, 2 * gib, limit) == limit - 2 * gib
    assert cuda_free(70 * gib, 0, 20 * gib, limit) == 0


ON_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, ON_CUDA])]
)
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "int8", "nf4"])
def test_footprint_from_headers_matches_the_loaded_model(
    device, precision, tiny_models
):
    path = tiny_models["bert64"]
    loaded = load_model(ModelSpec(path, "embed", precision), device)
    estimate = model_bytes(path, precision, device)
    assert estimate == pytest.approx(loaded.get_memory_footprint(), rel=0.05)


def test_int8_and_nf4_footprints_on_a_gpu_are_smaller_than_fp16(tiny_models):
    path = tiny_models["bert64"]
    fp16, int8, nf4 = (model_bytes(path, p, "cuda") for p in ("fp16", "int8", "nf4"))
    assert nf4 < int8 < fp16


def test_a_weight_file_that_is_not_safetensors_is_one_line(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match="--model: model.safetensors is not a safet"):
        model_bytes(str(tmp_path), "fp16")


@pytest.mark.usefixtures("ray_local")
def test_a_driver_holds_its_whole_gpu():
    from lmbatch.actors.predictor import _gpu_share

    assert _gpu_share() == 1.0  # Ray assigns a driver no share (seen failing on CUDA)


def test_gpu_size_is_the_smallest_gpu_nvidia_smi_lists():
    assert smallest_mib("143771\n81559\n") == 81559 * 2**20
    assert smallest_mib("[N/A]\n") is None  # torch answers instead
    assert smallest_mib("") is None


def test_auto_precision_is_fp32_on_cpu_and_an_actor_without_cuda_says_so(
    tiny_models,
):
    assert resolve_precision("auto", "cpu") == "fp32"
    path = tiny_models["bert"]
    spec = ModelSpec(path, "embed", "auto")
    info = inspect_model(path, "embed")
    actor = Predictor(PredictorConfig(spec, info, device="cuda", max_length=64))
    assert actor.device.type == "cpu"  # this machine has no CUDA
    assert (actor.stats.device, actor.stats.precision) == (NO_CUDA, "fp32")
    out = actor(_tokens(path, sentences(5)))
    assert out["embedding"].type == pa.list_(pa.float32(), 32)


def test_the_dry_run_names_the_precision_that_will_run(tiny_models):
    from dataclasses import replace

    from lmbatch.jobs.gpus import planned_precision

    info = inspect_model(tiny_models["bert"], "embed")
    assert planned_precision(info, "auto", "cpu") == "fp32 (auto on CPU)"
    assert planned_precision(info, "auto", "cuda").startswith("bf16, or fp16 ")
    assert planned_precision(info, "nf4", "cuda") == "nf4"
    artifact = replace(info, precision="int8")
    assert planned_precision(artifact, "auto", "cuda") == "int8 (the model's own)"


def _tokens(path: str, texts: list[str]) -> pa.Table:
    from lmbatch.actors.tokenize import TokenizeConfig, actor_batch

    return actor_batch(texts, TokenizeConfig(path, 64))


@pytest.mark.usefixtures("ray_local")
def test_summary_names_what_ran(tiny_models, corpus, tmp_path):
    _, summary = run_job(
        tmp_path / "out", model=tiny_models["bert"], inputs=corpus["csv"], task="embed"
    )
    assert summary.ran == ["cpu in fp32"]
    assert summary.lines()[0] == "ran on cpu in fp32"


@pytest.mark.usefixtures("ray_local")
def test_summary_says_where_the_time_went(tiny_models, corpus, tmp_path):
    _, summary = run_job(
        tmp_path / "out", model=tiny_models["bert"], inputs=corpus["csv"], task="embed"
    )
    stages = {s.name: s for s in summary.stages}
    assert list(stages) == ["read", "tokenize", "predict", "write"]
    assert stages["tokenize"].rows == stages["predict"].rows == 120
    assert all(s.tasks >= 1 and s.seconds > 0 for s in summary.stages)
    # One node: each stage's span is in the job, in pipeline order, and its tasks
    # used CPU (the tiny model's actor computes on it).
    for s in summary.stages:
        assert 0 <= s.began <= s.ended <= summary.seconds
    assert stages["read"].began <= stages["tokenize"].began <= stages["predict"].began
    assert stages["predict"].cpu_seconds > 0
    (line,) = [x for x in summary.lines() if x.startswith("stages ")]
    assert "; predict " in line and " at once) " in line
    written = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert written["stages"] == [asdict(s) for s in summary.stages]
    # Start-up: before the job (here Ray is up already: the plan), and into it.
    assert 0 < summary.startup_seconds and 0 < summary.first_batch_seconds
    assert 0 <= summary.ray_seconds <= summary.startup_seconds
    assert summary.first_batch_seconds < summary.seconds
    # Each actor process is ready (loaded, probed) before it can take a batch.
    assert len(summary.ready_seconds) == len(summary.actors)
    assert 0 < summary.ready_seconds[0] <= summary.first_batch_seconds
    ready = f"ready {summary.ready_seconds[0]:.1f}"
    assert ready in "".join(summary.lines())
    # Its start-up inside __init__ fits before it was ready, and the line splits it.
    actor = max(summary.actors, key=lambda a: a["ready_seconds"])
    assert actor["load_seconds"] > 0 and actor["probe_seconds"] > 0
    assert actor["import_seconds"] > 0
    spent = actor["import_seconds"] + actor["load_seconds"] + actor["probe_seconds"]
    began = actor["ready_seconds"] - spent
    assert 0 < began
    assert f"(the last began at {began:.1f}s: imports " in "".join(summary.lines())
    assert f"first batch {summary.first_batch_seconds:.1f}s into" in "".join(
        summary.lines()
    )


def test_stage_names_follow_ray_data_operators():
    from lmbatch.jobs.stages import Stage, stage_name

    assert stage_name("ReadParquetRows->SplitBlocks(32)") == "read"
    assert stage_name("MapBatches(tokenize_batch)") == "tokenize"
    assert stage_name("MapBatches(PredictActor)") == "predict"
    assert stage_name("CheckpointFilter") == "CheckpointFilter"
    assert Stage("predict", 16, 20.0, 100, 12.5, 1.5, 9.5).describe(10.0) == (
        "predict 16 tasks 20.0s, CPU 12.5s (2.0 at once) 1.5-9.5s"
    )
    assert Stage("read", 1, 0.5, 100).describe(0.0) == (
        "read 1 task 0.5s, CPU 0.0s (0.0 at once)"  # across nodes: no span
    )


@pytest.mark.usefixtures("ray_local")
def test_cuda_asked_of_a_cluster_without_gpus_is_one_line(
    tiny_models, corpus, tmp_path
):
    with pytest.raises(UserError, match="--device: cuda asked for"):
        run_job(
            tmp_path / "out",
            model=tiny_models["bert"],
            inputs=corpus["csv"],
            task="embed",
            device="cuda",
        )
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.usefixtures("ray_local")
def test_tokenize_is_a_stage_of_its_own(tiny_models, corpus, capsys):
    from lmbatch.jobs.infer import build_dataset, tokenize_config
    from lmbatch.jobs.pool import plan_pool
    from lmbatch.jobs.spec import InferSpec, prepare_infer

    plan = prepare_infer(
        InferSpec(
            model=tiny_models["bert"],
            inputs=(corpus["csv"],),
            task="embed",
            output="unused",
        )
    )
    pool = plan_pool({"CPU": 2.0}, None)
    build_dataset(plan, pool, tokenize_config(plan)).explain()
    physical = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    operators = [line for line in physical.splitlines() if "MapBatches" in line]
    assert any(o.endswith("[MapBatches(PredictActor)]") for o in operators), operators
    assert any("tokenize_batch)]" in o and "Predict" not in o for o in operators)


@pytest.mark.parametrize("asked", [None, "true"])
def test_a_tokenize_task_tokenizes_on_its_one_cpu(tiny_models, monkeypatch, asked):
    # The tokenizer's own pool would start a thread per core in every task.
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", asked or "")  # restored after
    if asked is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    assert _tokens(tiny_models["bert"], ["a text"]).num_rows == 1
    assert os.environ["TOKENIZERS_PARALLELISM"] == (asked or "false")  # a user's own


@pytest.mark.parametrize("model", ["bert", "bert_st", "gpt2", "llama"])
@pytest.mark.parametrize("on_long", ["truncate", "error"])
def test_tasks_tokenize_as_transformers_does(tiny_models, model, on_long):
    # The tasks' own engine (the fast tokenizer's definition) against transformers'
    # tokenizer: the same ids, special tokens, cuts and errors, row for row.
    from lmbatch.actors.tokenize import TokenizeConfig, actor_batch, with_backend

    lowercase = model.startswith("bert")  # sentence-transformers' do_lower_case too
    plain = TokenizeConfig(tiny_models[model], 12, on_long, lowercase=lowercase)
    fast = with_backend(plain)
    assert fast.backend is not None and plain.backend is None
    texts = ["Mixed CASE text", "a much longer text " * 8, "x", "ünïcödé ✓ 日本語"]
    expected = actor_batch(texts, plain)
    assert actor_batch(texts, fast).equals(expected)
    assert expected["_error"].null_count == (4 if on_long == "truncate" else 3)
    cut = on_long == "truncate"  # which rows lost tokens; no column under error
    assert _flags(expected) == ([False, True, False, False] if cut else None)
    # Text pairs: the pair template, longest-first cuts and each row's type-1 count.
    pairs = ["a pair", "x", "another much longer text " * 5, "y z"]
    expected = actor_batch(texts, plain, pairs)
    assert actor_batch(texts, fast, pairs).equals(expected)
    assert expected["_pair_tokens"].null_count == (0 if on_long == "truncate" else 2)
    assert _flags(expected) == ([False, True, True, False] if cut else None)


def _flags(tokens) -> list[bool] | None:
    names = tokens.column_names
    return tokens["_truncated"].to_pylist() if "_truncated" in names else None


@pytest.mark.parametrize("model", ["bert", "gpt2", "llama"])
def test_a_row_is_truncated_only_when_it_lost_tokens(tiny_models, model):
    # A text of exactly --max-length tokens is whole; one token more is cut. Both
    # engines; a continuation scored is cut from the left, the context only.
    from transformers import AutoTokenizer

    from lmbatch.actors.tokenize import TokenizeConfig, actor_batch, with_backend

    tok = AutoTokenizer.from_pretrained(tiny_models[model])
    specials = len(tok("the")["input_ids"]) - 1
    fits = " ".join(["the"] * (12 - specials))  # 12 tokens, special ones included
    texts = [fits, fits + " a", "a short one", fits + " a b c"]
    plain = TokenizeConfig(tiny_models[model], 12)
    for config in (plain, with_backend(plain)):
        rows = actor_batch(texts, config)
        assert rows["_ids"].to_pylist()[0] == tok(fits)["input_ids"]
        assert _flags(rows) == [False, True, False, True]
        assert rows["_error"].null_count == 4
    scored = TokenizeConfig(tiny_models[model], 12, min_tokens=2, continuation=True)
    rows = actor_batch(["the", "the " * 20, "a b"], scored, [" a", " b c", " the"])
    assert _flags(rows) == [False, True, False]
    assert rows["_pair_tokens"].to_pylist()[1] == 2  # the continuation stays whole


def test_a_chunked_text_keeps_every_token_and_a_tokenizers_that_drops_them_is_refused(
    tiny_models,
):
    # tokenizers 0.23.1-0.23.2 leave out a cut text's overflowing pieces: on the H200
    # machine's 0.23.2, --on-long chunk kept each long row's first window only. Each
    # window here is [CLS] piece [SEP]; the pieces, back to back, are the whole text.
    from transformers import AutoTokenizer

    from lmbatch.actors.tokenize import (
        TokenizeConfig,
        actor_batch,
        check_tokenizers,
        with_backend,
    )

    text = "the water is long and one day they could see the oil"
    rows = actor_batch(
        [text], with_backend(TokenizeConfig(tiny_models["bert"], 5, "chunk"))
    )
    ids, lengths = rows["_ids"].to_pylist()[0], rows["_windows"].to_pylist()[0]
    assert lengths == [5, 5, 5, 5]  # 12 words, 3 a window
    ends = np.cumsum(lengths)
    pieces = [ids[end - n + 1 : end - 1] for end, n in zip(ends, lengths, strict=True)]
    whole = AutoTokenizer.from_pretrained(tiny_models["bert"])(text)["input_ids"]
    assert sum(pieces, []) == whole[1:-1]
    with pytest.raises(UserError, match=r"^tokenizers: 0\.23\.2 loses a text's tokens"):
        check_tokenizers("0.23.2")
    check_tokenizers("0.23.3")  # the fix; 0.22 never had the fault


@pytest.mark.parametrize("model", ["bert", "llama"])
def test_a_text_cut_from_the_left_keeps_its_end_in_both_engines(tiny_models, model):
    # generate's prompts: the start is cut, special tokens kept, as transformers cuts
    # with truncation_side "left"; its cached tokenizer keeps its own side.
    from transformers import AutoTokenizer

    from lmbatch.actors.tokenize import (
        TokenizeConfig,
        actor_batch,
        load_tokenizer,
        with_backend,
    )

    left = TokenizeConfig(tiny_models[model], 6, truncation_side="left")
    texts = ["the water is long and one day they could see the oil", "a b"]
    rows = actor_batch(texts, left)
    assert rows.equals(actor_batch(texts, with_backend(left)))
    tok = AutoTokenizer.from_pretrained(tiny_models[model], truncation_side="left")
    want = tok(texts, truncation=True, max_length=6)["input_ids"]
    assert rows["_ids"].to_pylist() == want and _flags(rows) == [True, False]
    assert load_tokenizer(tiny_models[model], False, False).truncation_side == "right"


@pytest.mark.parametrize(
    ("model", "flags", "says"),
    [
        ("bert", {"max_length": 2}, "2 tokens: no room for a text after the "
         "model's 2 special tokens; give a longer --max-length"),
        ("bert", {"max_length": 5, "prefix": "the a of "}, "5 tokens: no room for a "
         "text after the prompt's 3 tokens and the model's 2 special tokens; give a "
         "longer --max-length or a shorter prompt"),
        ("gpt2", {"max_length": 1, "min_tokens": 2}, "1 token, fewer than the 2 "
         "this task needs of a row"),
        ("llama", {"max_length": 1, "truncation_side": "left"}, "1 token: no room "
         "for a text after the model's 1 special token; give a longer "
         "--max-length"),
        ("llama", {"max_length": 2, "prefix": "the a of ", "truncation_side": "left"},
         None),  # generate keeps a prompt's end: the text's
        ("bert", {"max_length": 6, "prefix": "the a of "}, None),
        ("bert_cls", {"max_length": 4, "pairs": True}, "4 tokens: no room for a "
         "text pair after the model's 3 special tokens; give a longer --max-length"),
        ("bert_cls", {"max_length": 5, "pairs": True}, None),  # a token each
    ],
)  # fmt: skip
def test_a_max_length_with_no_room_for_a_text_is_refused(
    tiny_models, model, flags, says
):
    # The tokenizer's task checks it while the job starts, before any row is read.
    from lmbatch.actors.tokenize import TokenizeConfig, with_backend

    config = TokenizeConfig(tiny_models[model], **flags)
    if says is None:
        assert with_backend(config).backend is not None
        return
    with pytest.raises(UserError) as refused:
        with_backend(config)
    assert str(refused.value) == f"--max-length: {says}"


def test_tokenize_tasks_import_neither_torch_nor_transformers():
    # Each task process imports this module; torch's import was what held the first
    # tokenize tasks back on a GPU node.
    code = (
        "import sys, lmbatch.actors.tokenize; "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
