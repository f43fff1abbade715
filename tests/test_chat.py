"""Chat models (``--chat-template``, ``--system-prompt``): each text a user's message
in the model's own template, after a system message where one is given. generate
answers it as ``model.generate`` on ``apply_chat_template``'s text would; score scores
a given answer after it as lm-evaluation-harness's loglikelihood with
``apply_chat_template`` does. A template that cannot take the job's messages is one
line before anything starts."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from conftest import sentences
from helpers import greedy, run_job
from test_cli_errors import assert_user_error
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmbatch.actors.serve import Accepts, BadRequest, parse_request
from lmbatch.errors import UserError
from lmbatch.jobs.cli import cli
from lmbatch.jobs.serve import prepare_serve
from lmbatch.jobs.spec import ServeSpec

pytestmark = pytest.mark.usefixtures("ray_local")
CHAT = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Gemma's templates raise on a system message; some others leave it out.
REFUSES = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}" + CHAT
)
DROPS = (
    "{% for m in messages if m['role'] == 'user' %}<|user|> {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
BROKEN = "{% for m in messages %}{{ m['content'] }"
SYSTEM = "you are one who can write about water"
ROWS = 24


def chat_model(tiny_models, path, template: str = CHAT, base: str = "gpt2") -> str:
    """A copy of a tiny causal LM whose tokenizer has ``template``."""
    shutil.copytree(tiny_models[base], path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = template
    tok.save_pretrained(path)
    return str(path)


def rendered(tok, text: str, system: str | None) -> str:
    messages = [{"role": "user", "content": text}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("system", [None, SYSTEM], ids=["user-only", "system"])
def test_generate_in_the_models_chat_template(system, tiny_models, corpus, tmp_path):
    """Against greedy decoding of apply_chat_template's text (the tiny Llama's
    continuations differ with the system message and without: the tiny GPT-2 ends
    every one at once)."""
    path = chat_model(tiny_models, tmp_path / "chat", base="llama")
    rows, _ = run_job(tmp_path / "out", model=path, inputs=corpus["parquet"],
                      task="generate", id_column="doc", max_new_tokens=5,
                      chat_template=True, system_prompt=system)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)

    def answer(text: str, system: str | None) -> str:
        text = rendered(tok, text, system)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return tok.decode(greedy(model, tok, ids, 5), skip_special_tokens=True)

    others = 0
    for i in range(0, 120, 6):
        expected = answer(corpus["texts"][i], system)
        assert expected and rows[f"doc-{i:03d}"]["generated_text"] == expected
        others += expected != answer(corpus["texts"][i], None if system else SYSTEM)
    assert others, "no answer depends on the system message"
    with pytest.raises(UserError, match="--chat-template: .* has no chat template"):
        run_job(tmp_path / "plain", model=tiny_models["gpt2"], task="generate",
                inputs=corpus["parquet"], chat_template=True)  # fmt: skip


def loglikelihood(model, tok, context: str, answer: str) -> tuple[float, int]:
    """(log-probability, tokens) of ``answer`` after the rendered ``context``, as
    lm-evaluation-harness scores it with a chat template: the template's text holds
    its own special tokens, so none are added; the answer's tokens are those of both
    texts together beyond the context's."""
    whole = tok(context + answer, add_special_tokens=False)["input_ids"]
    n = len(whole) - len(tok(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = model(ids).logits[0, :-1].log_softmax(-1)
    picked = logprobs[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
    return float(picked[-n:].sum()), n


@pytest.fixture(scope="module")
def answers(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("answers")
    table = pa.table({"q": sentences(ROWS, seed=5, max_words=8),
                      "a": [" " + s for s in sentences(ROWS, seed=6, max_words=6)],
                      "key": [f"a{i}" for i in range(ROWS)]})  # fmt: skip
    pq.write_table(table, root / "qa.parquet")
    return {"parquet": str(root / "qa.parquet"), **table.to_pydict()}


def test_score_an_answer_in_the_chat_template(tiny_models, answers, tmp_path):
    """A Llama-style tokenizer whose template begins with its BOS: the BOS is the
    template's, not added again; the system message moves every score."""
    path = chat_model(tiny_models, tmp_path / "chat", base="llama")
    flags = dict(model=path, inputs=answers["parquet"], task="score",
                 text_column="q", pair_column="a", id_column="key",
                 chat_template=True, system_prompt=SYSTEM)  # fmt: skip
    rows, summary = run_job(tmp_path / "out", **flags)
    assert summary.rows == ROWS and summary.errors == {}
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    moved = 0.0
    for i in range(ROWS):
        context = rendered(tok, answers["q"][i], SYSTEM)
        assert context.startswith("[BOS]") and not context.startswith("[BOS][BOS]")
        want, n = loglikelihood(model, tok, context, answers["a"][i])
        row = rows[f"a{i}"]
        assert row["num_tokens"] == n
        assert row["logprob"] == pytest.approx(want, rel=1e-4, abs=1e-4)
        plain, _ = loglikelihood(model, tok, rendered(tok, answers["q"][i], None),
                                 answers["a"][i])  # fmt: skip
        moved = max(moved, abs(plain - want))
    assert moved > 1e-3, "the system message changed no score"
    with pytest.raises(UserError, match="another --system-prompt"):
        run_job(tmp_path / "out", resume=True, **{**flags, "system_prompt": "be"})


def test_the_dry_run_says_how_texts_are_rendered(tiny_models, answers, tmp_path):
    from lmbatch.jobs.run import run_job as launch
    from lmbatch.jobs.spec import InferSpec

    path = chat_model(tiny_models, tmp_path / "chat")
    spec = InferSpec(model=path, inputs=(answers["parquet"],), task="score",
                     text_column="q", pair_column="a", chat_template=True,
                     system_prompt="be brief", output=str(tmp_path / "out"),
                     dry_run=True)  # fmt: skip
    lines = launch("infer", spec, None)
    assert "chat template: 'q' the user's message after 'be brief', 'a' the " \
        "answer scored" in lines  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "template, flag, says",
    [
        (REFUSES, "--system-prompt", "fails: System role not supported"),
        (DROPS, "--system-prompt", "leaves the system message out"),
        (BROKEN, "--chat-template", "fails: "),
    ],
    ids=["refuses", "drops", "broken"],
)
def test_a_template_that_cannot_take_the_messages_is_one_line(
    template, flag, says, tiny_models, corpus, tmp_path
):
    """Refused before Ray starts or anything is written, by the infer and the
    serve command alike."""
    path = chat_model(tiny_models, tmp_path / "chat", template)
    out = tmp_path / "out"
    args = ["infer", "--model", path, "--input", corpus["parquet"], "--task",
            "generate", "--output", str(out), "--chat-template",
            "--system-prompt", SYSTEM]  # fmt: skip
    assert_user_error(CliRunner().invoke(cli, args), flag, says)
    assert not out.exists()
    with pytest.raises(UserError, match=f"{flag}: .*{says}"):
        prepare_serve(ServeSpec(model=path, task="generate", chat_template=True,
                                system_prompt=SYSTEM))  # fmt: skip


def test_chat_flag_mistakes_are_one_line(tiny_models, answers, tmp_path):
    path = chat_model(tiny_models, tmp_path / "chat")
    base = ["infer", "--input", answers["parquet"], "--text-column", "q",
            "--output", str(tmp_path / "out")]  # fmt: skip
    alone = [*base, "--model", path, "--task", "generate", "--system-prompt", SYSTEM]
    assert_user_error(CliRunner().invoke(cli, alone), "--system-prompt",
                      "needs --chat-template")  # fmt: skip
    unpaired = [*base, "--model", path, "--task", "score", "--chat-template"]
    assert_user_error(CliRunner().invoke(cli, unpaired), "--chat-template",
                      "--pair-column")  # fmt: skip
    classify = [*base, "--model", tiny_models["bert_cls"], "--task", "classify",
                "--pair-column", "a", "--chat-template"]  # fmt: skip
    assert_user_error(CliRunner().invoke(cli, classify), "--chat-template",
                      "applies to --task generate or score")  # fmt: skip


def test_an_endpoint_that_scores_answers_takes_pairs_only():
    body = b'{"inputs": [["what is it", " water"], "what is it"]}'
    asked = parse_request(body, Accepts(pairs=True))
    assert asked.inputs[0] == ("what is it", " water")
    with pytest.raises(BadRequest, match=r"inputs\[1\] is a string; .*pairs"):
        parse_request(body, Accepts(pairs=True, single=False))
