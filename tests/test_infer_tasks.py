"""Each task end to end on a real local Ray, against direct transformers code."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import greedy, run_job
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    pipeline,
)

pytestmark = pytest.mark.usefixtures("ray_local")


def direct_hidden(path: str, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        return AutoModel.from_pretrained(path)(**enc).last_hidden_state[0], enc[
            "input_ids"
        ][0]


def test_embed_is_mean_pooled_and_normalised(tiny_models, corpus, embedded_corpus):
    """The shared job (conftest) that other tests take for the right embeddings."""
    rows, summary = embedded_corpus
    assert len(rows) == 120 and summary.rows == 120 and summary.errors == {}
    for i in (0, 7, 119):
        hidden, _ = direct_hidden(tiny_models["bert"], corpus["texts"][i])
        expected = F.normalize(hidden.mean(dim=0), dim=0).numpy()
        got = np.asarray(rows[f"doc-{i:03d}"]["embedding"], dtype=np.float32)
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_embed_honours_sentence_transformers_settings(tiny_models, corpus, tmp_path):
    """CLS pooling, no normalisation, max_seq_length 16: all from the model dir."""
    rows, _ = run_job(
        tmp_path / "out",
        model=tiny_models["bert_st"],
        inputs=corpus["parquet"],
        task="embed",
        id_column="doc",
    )
    long_row = next(i for i, t in enumerate(corpus["texts"]) if len(t.split()) > 16)
    tok = AutoTokenizer.from_pretrained(tiny_models["bert_st"])
    enc = tok(
        corpus["texts"][long_row], truncation=True, max_length=16, return_tensors="pt"
    )
    with torch.no_grad():
        cls = AutoModel.from_pretrained(tiny_models["bert_st"])(
            **enc
        ).last_hidden_state[0, 0]
    got = np.asarray(rows[f"doc-{long_row:03d}"]["embedding"])
    np.testing.assert_allclose(got, cls.numpy(), atol=1e-5)
    assert abs(np.linalg.norm(got) - 1.0) > 1e-3  # not normalised


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_score_matches_transformers_loss(name, tiny_models, corpus, tmp_path):
    path = tiny_models[name]
    rows, summary = run_job(
        tmp_path / "out",
        model=path,
        inputs=corpus["jsonl"],
        task="score",
        id_column="doc",
    )
    assert summary.rows == 120
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    for i in (0, 50, 119):
        ids = tok(corpus["texts"][i], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        n = ids.shape[1] - 1
        row = rows[f"doc-{i:03d}"]
        assert row["num_tokens"] == n
        assert row["logprob"] == pytest.approx(-loss * n, rel=1e-4)
        assert row["perplexity"] == pytest.approx(np.exp(loss), rel=1e-4)


def test_classify_labels_from_id2label(tiny_models, corpus, tmp_path):
    path = tiny_models["bert_cls"]
    rows, _ = run_job(
        tmp_path / "out",
        model=path,
        inputs=corpus["csv"],
        task="classify",
        id_column="doc",
    )
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    for i in (3, 90):
        with torch.no_grad():
            probs = torch.softmax(
                model(**tok(corpus["texts"][i], return_tensors="pt")).logits[0], -1
            )
        row = rows[f"doc-{i:03d}"]
        assert row["label"] == model.config.id2label[int(probs.argmax())]
        assert row["score"] == pytest.approx(float(probs.max()), abs=1e-5)
        np.testing.assert_allclose(row["probs"], probs.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "problem, labels",
    [("multi_label_classification", 3), (None, 1), ("regression", 1)],
)
def test_classify_scores_as_the_transformers_pipeline_does(
    problem, labels, tiny_models, corpus, tmp_path
):
    """Multi-label and one-output models take a sigmoid, regression none: a softmax
    over independent labels would be a wrong score on every row."""
    base = Path(tiny_models["bert_cls"])
    config = AutoConfig.from_pretrained(base)
    config.num_labels, config.problem_type = labels, problem
    torch.manual_seed(1)
    path = tmp_path / "model"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    for tokenizer_file in base.glob("*.*"):
        if not (path / tokenizer_file.name).exists():
            shutil.copy(tokenizer_file, path)
    rows, _ = run_job(tmp_path / "out", model=str(path), inputs=corpus["parquet"],
                      task="classify", id_column="doc")  # fmt: skip
    classifier = pipeline("text-classification", model=str(path), top_k=None)
    for i in (3, 90):
        (want,) = classifier([corpus["texts"][i]])  # every label, best first
        row = rows[f"doc-{i:03d}"]
        assert row["label"] == want[0]["label"]
        assert row["score"] == pytest.approx(want[0]["score"], abs=1e-5)
        by_label = {w["label"]: w["score"] for w in want}
        names = [config.id2label[j] for j in range(labels)]
        np.testing.assert_allclose(
            row["probs"], [by_label[n] for n in names], atol=1e-5
        )


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_batched_equals_one_by_one(name, tiny_models, corpus, tmp_path):
    """Left padding inside micro-batches must not change a greedy continuation."""
    path = tiny_models[name]
    rows, _ = run_job(
        tmp_path / "out",
        model=path,
        inputs=corpus["parquet"],
        task="generate",
        id_column="doc",
        max_new_tokens=5,
    )
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    for i in (1, 60):
        ids = tok(corpus["texts"][i], return_tensors="pt")["input_ids"]
        expected = tok.decode(greedy(model, tok, ids, 5), skip_special_tokens=True)
        assert rows[f"doc-{i:03d}"]["generated_text"] == expected


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_long_prompt_keeps_its_end_which_generation_continues(
    name, tiny_models, corpus, tmp_path
):
    """Cut to --max-length, a prompt loses its start, not its end: the new tokens
    continue the text (vLLM's truncate_prompt_tokens keeps the last tokens too)."""
    path = tiny_models[name]
    rows, summary = run_job(tmp_path / "out", model=path, inputs=corpus["parquet"],
                            task="generate", id_column="doc", max_new_tokens=4,
                            max_length=6)  # fmt: skip
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok.truncation_side = "left"  # transformers' own cut from the start, specials kept
    long = [i for i, t in enumerate(corpus["texts"]) if len(tok(t)["input_ids"]) > 6]
    assert summary.truncated == len(long) > 20
    assert [
        i for i in range(len(corpus["texts"])) if rows[f"doc-{i:03d}"]["truncated"]
    ] == long
    for i in long[:8]:
        ids = tok(corpus["texts"][i], truncation=True, max_length=6,
                  return_tensors="pt")["input_ids"]  # fmt: skip
        expected = tok.decode(greedy(model, tok, ids, 4), skip_special_tokens=True)
        assert rows[f"doc-{i:03d}"]["generated_text"] == expected


def test_generate_stops_at_every_stop_token_of_the_generation_config(
    tiny_models, corpus, tmp_path
):
    """A chat model's generation_config lists several eos tokens (Llama 3: the end
    of text and of a turn); generation stops at each, as model.generate does."""
    path = tmp_path / "model"
    shutil.copytree(tiny_models["gpt2"], path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tok(corpus["texts"][1], return_tensors="pt")["input_ids"]
    first = greedy(model, tok, ids, 5)[0]  # its first new token
    model.generation_config.eos_token_id = [tok.eos_token_id, int(first)]
    model.generation_config.save_pretrained(path)
    rows, _ = run_job(tmp_path / "out", model=str(path), inputs=corpus["parquet"],
                      task="generate", id_column="doc", max_new_tokens=5)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    for i in (1, 60):
        ids = tok(corpus["texts"][i], return_tensors="pt")["input_ids"]
        expected = tok.decode(greedy(model, tok, ids, 5), skip_special_tokens=True)
        assert rows[f"doc-{i:03d}"]["generated_text"] == expected
    stopped = rows["doc-001"]["generated_text"]
    assert stopped == tok.decode([int(first)], skip_special_tokens=True)


def test_pickle_weights_load_when_allowed(tiny_models, corpus, tmp_path):
    import shutil

    from transformers import GPT2LMHeadModel

    model_dir = tmp_path / "pickled"
    shutil.copytree(tiny_models["gpt2"], model_dir)
    (model_dir / "model.safetensors").unlink()
    state = GPT2LMHeadModel.from_pretrained(tiny_models["gpt2"]).state_dict()
    torch.save(state, model_dir / "pytorch_model.bin")
    rows, _ = run_job(
        tmp_path / "out",
        model=str(model_dir),
        inputs=corpus["parquet"],
        task="score",
        id_column="doc",
        allow_pickle=True,
    )
    reference, _ = run_job(
        tmp_path / "ref",
        model=tiny_models["gpt2"],
        inputs=corpus["parquet"],
        task="score",
        id_column="doc",
    )
    assert rows["doc-005"]["logprob"] == pytest.approx(
        reference["doc-005"]["logprob"], rel=1e-6
    )
