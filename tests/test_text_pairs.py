"""Text pairs (``--pair-column``): a cross-encoder's (query, passage) or an NLI model's
(premise, hypothesis), scored as the tools a user would otherwise run score them:
sentence-transformers' ``CrossEncoder.predict`` and transformers' text-classification
pipeline with ``text_pair``."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from conftest import sentences
from helpers import greedy, run_job, wide_classifier
from test_cli_errors import assert_user_error
from transformers import pipeline

from lmbatch.errors import UserError
from lmbatch.jobs.cli import cli

pytestmark = pytest.mark.usefixtures("ray_local")
ROWS = 40


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict:
    """40 (query, passage) rows; the passages run past the models' 64 positions, so
    the pair is cut longest first, as CrossEncoder cuts it."""
    root = tmp_path_factory.mktemp("pairs")
    queries = sentences(ROWS, seed=1, max_words=6)
    passages = sentences(ROWS, seed=2, max_words=90)
    table = pa.table({"q": queries, "passage": passages,
                      "key": [f"p{i}" for i in range(ROWS)]})  # fmt: skip
    pq.write_table(table, root / "pairs.parquet")
    return {"parquet": str(root / "pairs.parquet"), "q": queries, "p": passages}


def test_a_cross_encoder_scores_pairs_as_sentence_transformers(
    tiny_models, pairs, tmp_path
):
    from sentence_transformers import CrossEncoder

    path = wide_classifier(tiny_models, tmp_path / "reranker", labels=1)
    rows, summary = run_job(tmp_path / "out", model=path, inputs=pairs["parquet"],
                            task="classify", text_column="q", pair_column="passage",
                            id_column="key", keep_columns=("q",))  # fmt: skip
    assert summary.rows == ROWS and summary.errors == {}
    want = CrossEncoder(path, device="cpu").predict(
        list(zip(pairs["q"], pairs["p"], strict=True)), batch_size=7
    )
    got = np.array([rows[f"p{i}"]["score"] for i in range(ROWS)])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert rows["p3"]["q"] == pairs["q"][3]  # a kept column rides along as it was


@pytest.mark.parametrize("token_types", [True, False], ids=["bert", "no-types"])
def test_an_nli_model_scores_pairs_as_the_transformers_pipeline(
    token_types, tiny_models, pairs, tmp_path
):
    """Three labels, softmax; with a tokenizer that gives no token types (RoBERTa's),
    none go to the model, as the pipeline sends none."""
    path = wide_classifier(tiny_models, tmp_path / "nli", 3, token_types)
    rows, _ = run_job(tmp_path / "out", model=path, inputs=pairs["parquet"],
                      task="classify", text_column="q", pair_column="passage",
                      id_column="key")  # fmt: skip
    nli = pipeline("text-classification", model=path, top_k=None)
    for i in (0, 17, 39):
        (want,) = nli(
            [{"text": pairs["q"][i], "text_pair": pairs["p"][i]}],
            truncation=True,
        )
        row = rows[f"p{i}"]
        assert row["label"] == want[0]["label"]
        assert row["score"] == pytest.approx(want[0]["score"], abs=1e-5)


def loglikelihood(model, tok, context: str, continuation: str, max_length: int):
    """(log-probability, tokens, is_greedy) of ``continuation`` after ``context``, as
    lm-evaluation-harness's loglikelihood computes them: both texts tokenized
    together, the continuation's tokens those beyond the context's own, the context
    cut from the left to fit; greedy where each is the model's most likely token."""
    whole = tok(context + continuation)["input_ids"]
    n = len(whole) - len(tok(context)["input_ids"])
    ids = torch.tensor([whole[-max_length:]])
    with torch.no_grad():
        logprobs = model(ids).logits[0, :-1].log_softmax(-1)
    picked = logprobs[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
    greedy = bool((logprobs.argmax(-1)[-n:] == ids[0, 1:][-n:]).all())
    return float(picked[-n:].sum()), n, greedy


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_score_a_continuation_as_lm_evaluation_harness_does(
    name, tiny_models, tmp_path
):
    """Only the continuation is scored, conditioned on its context; a context past
    the model's 64 positions is cut from the left; a continuation that leaves no
    room for context is a too_long row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    contexts = sentences(30, seed=3, max_words=90)
    endings = [" " + s for s in sentences(30, seed=4, max_words=6)]
    endings[7] = " " + " ".join(["water"] * 70)
    path = tiny_models[name]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    for i in range(0, 30, 3):  # the model's own continuation: greedy throughout
        ids = tok(contexts[i], return_tensors="pt")["input_ids"][:, -40:]
        ending = tok.decode(greedy(model, tok, ids, 3), skip_special_tokens=True)
        endings[i] = " " + ending if ending else endings[i]
    data = tmp_path / "pairs.parquet"
    keys = [f"k{i}" for i in range(30)]
    pq.write_table(pa.table({"ctx": contexts, "end": endings, "key": keys}), data)
    rows, summary = run_job(tmp_path / "out", model=path, inputs=str(data),
                            task="score", text_column="ctx", pair_column="end",
                            id_column="key")  # fmt: skip
    assert rows["k7"]["error"].startswith("too_long: ")
    assert summary.errors == {"too_long": 1}
    cut, greedy_rows = 0, set()
    for i in set(range(30)) - {7}:
        want, n, is_greedy = loglikelihood(model, tok, contexts[i], endings[i], 64)
        row = rows[f"k{i}"]
        assert row["error"] is None and row["num_tokens"] == n
        assert row["logprob"] == pytest.approx(want, rel=1e-4, abs=1e-4)
        assert row["is_greedy"] is is_greedy
        greedy_rows |= {i} if is_greedy else set()
        cut += len(tok(contexts[i] + endings[i])["input_ids"]) > 64
    assert cut, "no context was long enough to be cut"
    assert 0 < len(greedy_rows) < 29, greedy_rows  # both kinds of row were checked


def test_a_pair_whose_second_text_is_bad_is_an_error_row(tiny_models, tmp_path):
    lines = [
        {"text": "the first one", "hyp": "is a pair"},
        {"text": "the second one", "hyp": ""},
        {"text": "the third one"},
        {"text": "the fourth one", "hyp": 4},
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    path = wide_classifier(tiny_models, tmp_path / "nli", 3)
    rows, summary = run_job(tmp_path / "out", model=path, inputs=str(data),
                            task="classify", pair_column="hyp")  # fmt: skip
    errors = [rows[f"{data}#{i}"]["error"] for i in range(4)]
    assert errors == [
        None,
        "empty_text: 'hyp' is empty",
        "null_text: the line has no 'hyp' key",
        "not_string: 'hyp' is a number",
    ]
    assert summary.rows == 4


def test_pair_column_mistakes_are_one_line(tiny_models, pairs, tmp_path):
    base = ["--model", tiny_models["bert_cls"], "--input", pairs["parquet"],
            "--text-column", "q", "--output", str(tmp_path / "out")]  # fmt: skip
    missing = CliRunner().invoke(
        cli, ["infer", *base, "--task", "classify", "--pair-column", "nope"]
    )
    assert_user_error(missing, "--pair-column", "'nope'")
    embed = CliRunner().invoke(
        cli, ["infer", *base, "--task", "embed", "--pair-column", "passage"]
    )
    assert_user_error(embed, "--pair-column", "applies to --task classify or score")


def test_a_resume_with_another_pair_column_is_refused(tiny_models, pairs, tmp_path):
    from lmbatch.jobs.run import run_job as launch
    from lmbatch.jobs.spec import InferSpec

    flags = dict(model=tiny_models["bert_cls"], inputs=pairs["parquet"],
                 task="classify", text_column="q", id_column="key")  # fmt: skip
    dry = InferSpec(dry_run=True, pair_column="passage", output=str(tmp_path / "out"),
                    **{**flags, "inputs": (pairs["parquet"],)})  # fmt: skip
    assert "text pairs: 'q' with 'passage'" in launch("infer", dry, None)
    run_job(tmp_path / "out", pair_column="passage", **flags)
    with pytest.raises(
        UserError, match="another --pair-column: 'passage', now not given"
    ):
        run_job(tmp_path / "out", resume=True, **flags)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("task", ["classify", "score"])
def test_pairs_on_cuda_as_on_cpu(task, tiny_models, pairs, tmp_path):
    """A pair's marks (token types; the tokens scored) built on the host go up with
    the ids; fp16 on the GPU stays within a rounding of the fp32 CPU job."""
    path = tiny_models["llama"]
    if task == "classify":
        path = wide_classifier(tiny_models, tmp_path / "nli", 3)
    flags = dict(model=path, inputs=pairs["parquet"], task=task,
                 text_column="q", pair_column="passage", id_column="key")  # fmt: skip
    cpu, expected = run_job(tmp_path / "cpu", device="cpu", precision="fp32", **flags)
    gpu, summary = run_job(tmp_path / "gpu", device="cuda", precision="fp16", **flags)
    assert all(r.startswith("cuda (") for r in summary.ran), summary.ran
    assert summary.errors == expected.errors  # score: continuations past 63 tokens
    column = "probs" if task == "classify" else "logprob"
    keys = [key for key, row in cpu.items() if row["error"] is None]
    got = np.array([gpu[key][column] for key in keys])
    want = np.array([cpu[key][column] for key in keys])
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=1e-2)
