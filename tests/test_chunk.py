"""--on-long chunk reads a long text whole, in windows of --max-length: embed averages
the windows' vectors by their tokens, as a user would from sentence-transformers' own
vector of each window; score sums the log-probabilities of strided windows, as
Hugging Face's perplexity guide computes a long text's."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import sentences
from helpers import run_job, wide_classifier
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer import modules as st
from test_sentence_transformers import build
from test_serve import post, serving
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from lmbatch.actors.model_info import ModelSpec, inspect_model
from lmbatch.actors.predict import PredictorConfig
from lmbatch.actors.predictor import Predictor
from lmbatch.actors.sentence import Encoding, resolve_prompt
from lmbatch.actors.tokenize import TokenizeConfig, actor_batch, with_backend
from lmbatch.errors import UserError
from lmbatch.jobs.run import run_job as launch
from lmbatch.jobs.spec import InferSpec, check_task_flags

TEXTS = [*sentences(20, seed=3, max_words=40), "a", "the water is long"]
MODELS = {
    "normalized": lambda t: [st.Pooling(32, pooling_mode="mean"), st.Normalize()],
    "dense, not normalized": lambda t: [
        st.Pooling(32, pooling_mode=("cls", "max")),
        st.Dense(64, 8, activation_function=torch.nn.Tanh()),
    ],
}


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("chunk")
    return {
        name: build(root, name.replace(" ", "_").replace(",", ""), tiny_models, m)
        for name, m in MODELS.items()
    }


def expected(
    path: str, texts: list[str], max_length: int, overlap: int = 0
) -> tuple[np.ndarray, list[int]]:
    """Each text's embedding from sentence-transformers alone: the vector of each of
    its windows (transformers' overflowing windows of ``max_length`` tokens, each
    repeating ``overlap`` of the one before: its ``stride``), their mean weighted by
    tokens, L2-normalised where the model normalises; and how many windows each text
    took."""
    model = SentenceTransformer(path, device="cpu")
    windows = model.tokenizer(
        texts, truncation=True, max_length=max_length, stride=overlap,
        return_overflowing_tokens=True,
    )  # fmt: skip
    rows: dict[int, list] = {}
    for row, ids in zip(
        windows["overflow_to_sample_mapping"], windows["input_ids"], strict=True
    ):
        x = torch.tensor([ids])
        with torch.no_grad():
            vector = model({"input_ids": x, "attention_mask": torch.ones_like(x)})
        rows.setdefault(row, []).append((vector["sentence_embedding"][0], len(ids)))
    out = []
    for i in range(len(texts)):
        total = sum(n for _, n in rows[i])
        mean = sum(v * n for v, n in rows[i]) / total
        if isinstance(model[-1], st.Normalize):
            mean = torch.nn.functional.normalize(mean, dim=0)
        out.append(mean.numpy())
    return np.array(out), [len(rows[i]) for i in range(len(texts))]


@pytest.mark.parametrize(
    ("name", "overlap"), [(name, None) for name in MODELS] + [("normalized", 5)]
)
def test_a_long_text_is_the_token_weighted_mean_of_its_windows(models, name, overlap):
    """``overlap`` 5 (--chunk-overlap) of a window's 6 tokens of text: each window
    adds one token, the most the tokenizers library's stride allows."""
    path = models[name]
    info = inspect_model(path, "embed")
    # A fixed budget of 24 tokens: one text's windows fall in several micro-batches.
    config = PredictorConfig(
        ModelSpec(path, "embed"), info, max_length=8, batch_tokens=24, chunk=True
    )
    actor = Predictor(config)
    tokens = TokenizeConfig(path, 8, on_long="chunk", overlap=overlap)
    batch = actor_batch(TEXTS, with_backend(tokens))
    assert batch.equals(actor_batch(TEXTS, tokens))  # transformers' windows too
    out = actor(batch)
    assert out["error"].null_count == len(TEXTS)
    want, windows = expected(path, TEXTS, 8, overlap or 0)
    if overlap:  # a window a token: as many as a text has tokens past the first 6
        lengths = [len(actor.tokenizer(t)["input_ids"]) - 2 for t in TEXTS]
        assert windows == [max(1, n - 5) for n in lengths]
    got = np.array(out["embedding"].to_pylist())
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    assert out["windows"].to_pylist() == windows  # each row says how many it took
    assert sum(n > 1 for n in windows) >= 15
    # The summary's rows per micro-batch count windows: what the batches held.
    assert actor.stats.batched == sum(windows)
    assert "truncated" not in out.column_names  # no row is cut
    assert actor.stats.micro_batches > len(TEXTS)
    # The windows' mean, not the first window's alone: what truncating would give.
    cut = SentenceTransformer(path, device="cpu")
    cut.max_seq_length = 8
    assert not np.allclose(got[0], cut.encode(TEXTS[:1])[0], atol=1e-3)


def test_the_mean_is_then_cut_normalized_and_packed(models):
    path = models["dense, not normalized"]
    info = inspect_model(path, "embed")
    tokens = with_backend(TokenizeConfig(path, 8, on_long="chunk"))
    want, _ = expected(path, TEXTS, 8)
    for encoding, expect in [
        (Encoding(truncate_dim=5, normalize=True), _unit(want[:, :5])),
        (Encoding(precision="ubinary"), np.packbits(want > 0, axis=-1)),
    ]:
        config = PredictorConfig(
            ModelSpec(path, "embed"), info, max_length=8, chunk=True, encoding=encoding
        )
        out = Predictor(config)(actor_batch(TEXTS, tokens))
        got = np.array(out["embedding"].to_pylist())
        np.testing.assert_allclose(got, expect, atol=2e-5, rtol=1e-4)


def chunked_job(tmp_path, corpus, model: str, task: str, **flags):
    """A job over the test corpus in windows of 8 tokens: (rows by id, summary)."""
    return run_job(
        tmp_path / "out", model=model, inputs=corpus["parquet"], task=task,
        id_column="doc", max_length=8, on_long="chunk", **flags,
    )  # fmt: skip


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.usefixtures("ray_local")
def test_a_chunked_job_embeds_every_row_and_says_how_many_were_chunked(
    models, corpus, tmp_path
):
    path = models["normalized"]
    rows, summary = chunked_job(tmp_path, corpus, path, "embed")
    want, windows = expected(path, corpus["texts"], 8)
    got = np.array([rows[f"doc-{i:03d}"]["embedding"] for i in range(120)])
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    assert [rows[f"doc-{i:03d}"]["windows"] for i in range(120)] == windows
    assert summary.errors == {} and summary.truncated == 0
    chunked = sum(n > 1 for n in windows)
    assert summary.chunked == chunked > 0
    assert summary.windows == sum(n for n in windows if n > 1)
    line = f"chunked {chunked} rows into {summary.windows} windows of --max-length 8"
    assert any(x.startswith(line) for x in summary.lines())
    with pytest.raises(UserError, match="another --on-long"):
        run_job(tmp_path / "out", model=path, inputs=corpus["parquet"], task="embed",
                id_column="doc", max_length=8, resume=True)  # fmt: skip
    dry = InferSpec(model=path, inputs=(corpus["parquet"],), task="embed",
                    output=str(tmp_path / "dry"), max_length=8, on_long="chunk",
                    dry_run=True)  # fmt: skip
    assert "long texts read whole in windows of 8 tokens" in launch("infer", dry, None)


@pytest.mark.usefixtures("ray_local")
def test_a_long_text_is_classified_by_its_windows_mean_scores(
    tiny_models, corpus, tmp_path
):
    """Each label's score is the mean of the windows' (transformers' overflowing
    windows, each classified alone), weighted by their tokens; the label is the
    highest's."""
    path = wide_classifier(tiny_models, tmp_path / "model", labels=4)
    rows, summary = chunked_job(tmp_path, corpus, path, "classify")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    windows = tokenizer(
        corpus["texts"], truncation=True, max_length=8, return_overflowing_tokens=True
    )
    of_row: dict[int, list] = {}
    for row, ids in zip(
        windows["overflow_to_sample_mapping"], windows["input_ids"], strict=True
    ):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        of_row.setdefault(row, []).append((torch.softmax(logits, -1).numpy(), len(ids)))
    for i, scored in of_row.items():
        got = rows[f"doc-{i:03d}"]
        want = sum(p * n for p, n in scored) / sum(n for _, n in scored)
        np.testing.assert_allclose(got["probs"], want, atol=1e-5)
        assert got["label"] == model.config.id2label[int(want.argmax())]
        assert got["score"] == pytest.approx(want.max(), abs=1e-5)
        assert got["windows"] == len(scored)
    assert summary.chunked == sum(len(s) > 1 for s in of_row.values()) > 0
    assert summary.errors == {} and summary.truncated == 0


def test_chunk_is_refused_for_other_tasks_and_text_pairs(tiny_models):
    spec = InferSpec(model=tiny_models["gpt2"], inputs=("x",), output="o",
                     task="generate", on_long="chunk")  # fmt: skip
    with pytest.raises(UserError) as e:
        check_task_flags(spec, inspect_model(spec.model, spec.task))
    assert str(e.value) == (
        "--on-long chunk: applies to --task embed, score or classify, not generate"
    )
    with pytest.raises(UserError, match="--on-long: chunk reads a long text whole"):
        InferSpec.from_flags(
            model=tiny_models["gpt2"], inputs=("x",), output="o", task="score",
            on_long="chunk", pair_column="a",
        )  # fmt: skip
    with pytest.raises(UserError, match="a pair too long is cut longest text first"):
        InferSpec.from_flags(
            model=tiny_models["bert_cls"], inputs=("x",), output="o",
            task="classify", on_long="chunk", pair_column="a",
        )  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"task": "embed", "chunk_overlap": 2}, "applies to --on-long chunk"),
        ({"task": "score", "on_long": "chunk", "chunk_overlap": 0},
         "--task score needs at least 1: a window's first token is context only, "
         "so it must be one the window before scored"),
        ({"task": "embed", "on_long": "chunk", "chunk_overlap": 8, "max_length": 8},
         "8 tokens leave no new token in a window of --max-length 8"),
    ],
)  # fmt: skip
def test_an_overlap_without_windows_or_new_tokens_is_refused(
    tiny_models, flags, message
):
    with pytest.raises(UserError) as e:
        InferSpec.from_flags(
            model=tiny_models["gpt2"], inputs=("x",), output="o", **flags
        )
    assert str(e.value) == f"--chunk-overlap: {message}"


def test_an_overlap_that_fills_the_room_after_the_prompt_is_refused(prompted):
    """What is left of a window for text is known once the tokenizer is: 9 tokens
    less [CLS], [SEP] and the prompt's 2."""
    path = prompted[True]
    prompt = resolve_prompt(inspect_model(path, "embed").sentence, None, None)
    config = TokenizeConfig(path, 9, on_long="chunk", prefix=prompt, overlap=5)
    with pytest.raises(UserError) as e:
        with_backend(config)
    assert str(e.value) == (
        "--chunk-overlap: 5 tokens leave no new token in a window, which holds 5 "
        "tokens of text (--max-length 9 less 2 special tokens and 2 prompt tokens)"
    )
    with_backend(replace(config, overlap=4))  # one new token a window


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize(
    ("name", "overlap"), [("gpt2", None), ("llama", None), ("gpt2", 1)]
)
def test_a_long_text_is_scored_whole_in_strided_windows(
    tiny_models, corpus, tmp_path, name, overlap
):
    """By default each window ends half a window after the one before; with
    --chunk-overlap 1, a window on, all of it scored but its first token."""
    path = tiny_models[name]
    rows, summary = chunked_job(tmp_path, corpus, path, "score", chunk_overlap=overlap)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    long = 0
    for i, text in enumerate(corpus["texts"]):
        ids = tok(text)["input_ids"]
        long += len(ids) > 8
        logprob, greedy = strided(model, ids, 8, 8 - (overlap or 4))
        row = rows[f"doc-{i:03d}"]
        assert row["num_tokens"] == len(ids) - 1  # every token but the first
        assert row["logprob"] == pytest.approx(logprob, rel=1e-4)
        assert row["perplexity"] == pytest.approx(np.exp(-logprob / (len(ids) - 1)))
        assert row["is_greedy"] == greedy
    assert summary.chunked == long > 60 and summary.truncated == 0
    if not overlap:  # the default spelled out is the same job: nothing to compute
        _, again = chunked_job(
            tmp_path, corpus, path, "score", chunk_overlap=4, resume=True
        )
        assert again.restored == 120 and again.computed == 0
        return
    # 7 tokens on a window: fewer windows than half a window on
    assert summary.windows == sum(
        -(-(len(tok(t)["input_ids"]) - 1) // 7)
        for t in corpus["texts"]
        if len(tok(t)["input_ids"]) > 8
    )
    with pytest.raises(UserError, match="another --chunk-overlap: 1, now not given"):
        chunked_job(tmp_path, corpus, path, "score", resume=True)


def strided(model, ids: list[int], length: int, stride: int) -> tuple[float, bool]:
    """A text's log-likelihood as Hugging Face's perplexity guide computes it with
    ``stride``: each window predicts the tokens the last did not."""
    total, greedy, done = 0.0, True, 0
    for end in [*range(length, len(ids), stride), len(ids)]:
        window = torch.tensor([ids[max(0, end - length) : end]])
        with torch.no_grad():
            logits = model(window).logits[0, :-1]
        targets = window[0, 1:]
        new = min(end - done, len(targets))  # the first window: all but its first
        logprobs = torch.log_softmax(logits, -1)[torch.arange(len(targets)), targets]
        total += float(logprobs[-new:].sum())
        greedy &= bool((logits.argmax(-1) == targets)[-new:].all())
        done = end
    return total, greedy


@pytest.fixture(scope="module")
def prompted(tiny_models, tmp_path_factory) -> dict[bool, str]:
    """include_prompt -> a model whose default prompt is 'query: ', pooled with it
    or without it (sentence-transformers' include_prompt)."""
    root = tmp_path_factory.mktemp("chunk-prompted")
    made = {}
    for include in (True, False):
        model = SentenceTransformer(
            modules=[st.Transformer(tiny_models["bert"]),
                     st.Pooling(32, pooling_mode="mean", include_prompt=include)],
            prompts={"query": "query: "}, default_prompt_name="query",
        )  # fmt: skip
        model.save(str(root / str(include)))
        made[include] = str(root / str(include))
    return made


@pytest.mark.parametrize("include", [True, False])
def test_each_window_begins_with_the_prompt(prompted, include):
    """A long text's every window reads as a whole text would: [CLS], the prompt,
    a piece of the text, [SEP]; left out of pooling where the model says so."""
    path = prompted[include]
    info = inspect_model(path, "embed")
    prompt = resolve_prompt(info.sentence, None, None)
    config = PredictorConfig(ModelSpec(path, "embed"), info, max_length=9,
                             prompt=prompt, chunk=True)  # fmt: skip
    tokens = with_backend(TokenizeConfig(path, 9, on_long="chunk", prefix=prompt))
    got = np.array(
        Predictor(config)(actor_batch(TEXTS, tokens))["embedding"].to_pylist()
    )
    model = SentenceTransformer(path, device="cpu")
    tok = model.tokenizer
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    room = 9 - 2 - len(prompt_ids)
    whole = [len(tok(prompt + text)["input_ids"]) <= 9 for text in TEXTS]
    assert 2 <= sum(whole) <= len(TEXTS) - 10
    for text, vector, fits in zip(TEXTS, got, whole, strict=True):
        if fits:  # as encode gives it
            want = model.encode([text], prompt=prompt)[0]
        else:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            windows = [
                [tok.cls_token_id, *prompt_ids, *ids[i : i + room], tok.sep_token_id]
                for i in range(0, len(ids), room)
            ]
            want = _mean(model, windows, prompt_length=1 + len(prompt_ids))
        np.testing.assert_allclose(vector, want, atol=2e-5, rtol=1e-4)


def _mean(model, windows: list[list[int]], prompt_length: int) -> np.ndarray:
    """sentence-transformers' vectors of each window, averaged by tokens."""
    total = 0
    for ids in windows:
        x = torch.tensor([ids])
        features = {"input_ids": x, "attention_mask": torch.ones_like(x),
                    "prompt_length": prompt_length}  # fmt: skip
        with torch.no_grad():
            total = total + model(features)["sentence_embedding"][0] * len(ids)
    return (total / sum(map(len, windows))).numpy()


def test_serve_reads_long_texts_whole_too(models):
    """Real HTTP to an `lmbatch serve --on-long chunk` process: each input's vector
    is its windows' mean, as a job's row is."""
    path = models["normalized"]
    flags = ("--model", path, "--task", "embed", "--on-long", "chunk")
    with serving(
        *flags, "--max-length", "8", "--truncate-dim", "5", "--normalize"
    ) as url:
        status, answer = post(url, {"inputs": TEXTS})
    assert status == 200, answer
    got = np.array([r["embedding"] for r in answer["results"]])
    want, _ = expected(path, TEXTS, 8)  # averaged first, then cut and normalised
    np.testing.assert_allclose(got, _unit(want[:, :5]), atol=2e-5, rtol=1e-4)


def test_a_rows_windows_add_up_and_are_greedy_only_all_together():
    from lmbatch.actors.tasks import Score

    windows = {
        "logprob": np.array([-3.0, -2.0, -1.5, -4.0]),
        "num_tokens": np.array([7, 4, 3, 2], dtype=np.int32),
        "is_greedy": np.array([True, False, True, True]),
    }
    rows = Score().merge(windows, first=np.array([0, 2, 3]), tokens=np.full(4, 8))
    assert rows["logprob"].tolist() == [-5.0, -1.5, -4.0]
    assert rows["num_tokens"].tolist() == [11, 3, 2]
    np.testing.assert_allclose(rows["perplexity"], np.exp([5 / 11, 0.5, 2.0]))
    assert rows["is_greedy"].tolist() == [False, True, True]
