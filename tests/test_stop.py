"""Where a generated row ends (``--stop``, end-of-text tokens) and what the output
says of it: ``finish_reason`` (stop or length) and ``generated_tokens``."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest
import torch
from click.testing import CliRunner
from helpers import greedy, run_job
from test_cli_errors import assert_user_error
from transformers import AutoModelForCausalLM, AutoTokenizer, StopStringCriteria

from lmbatch.actors.stopping import end_ids
from lmbatch.actors.tasks import Generate
from lmbatch.errors import UserError
from lmbatch.jobs.cli import cli

NEW = 8


@pytest.fixture(scope="module")
def gpt2(tiny_models, tmp_path_factory) -> str:
    """The tiny GPT-2 with a tokenizer that can spell the word transformers' stop
    matcher spells each token after (its word-level one cannot)."""
    path = tmp_path_factory.mktemp("stop") / "gpt2"
    shutil.copytree(tiny_models["gpt2"], path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_tokens(["abcdef"])
    tok.save_pretrained(path)
    return str(path)


def alone(model, tok, text: str, stops: list[str]) -> dict:
    """One row as it ends alone: greedy tokens cut at the first whose new tokens
    end in a stop string (transformers' own matcher, on the new tokens only) or
    at an end-of-text token."""
    ids = tok(text, return_tensors="pt")["input_ids"]
    new = greedy(model, tok, ids, NEW)
    matcher = StopStringCriteria(tok, stops)
    ends = set(end_ids(model, tok))
    stopped = False
    for n in range(1, len(new) + 1):
        if new[n - 1].item() in ends or matcher(new[None, :n], None).item():
            stopped = True
            break
    text = tok.decode(new[:n], skip_special_tokens=True)
    cut = min([text.find(s) for s in stops if s in text], default=len(text))
    return {"generated_text": text[:cut], "generated_tokens": n,
            "finish_reason": "stop" if stopped else "length"}  # fmt: skip


def test_rows_end_at_stop_strings_as_each_would_alone(gpt2, corpus, tmp_path):
    """The 120 rows in batches end where each ends alone; a string that ends only
    across the prompt's end (its last word and the first new one) stops nothing."""
    path = gpt2
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    texts = corpus["texts"]
    first = [tok.convert_ids_to_tokens(greedy(model, tok, tok(t, return_tensors="pt")
             ["input_ids"], NEW)) for t in texts]  # fmt: skip
    words = Counter(w for new in first for w in set(new))
    common = next(w for w, n in words.most_common() if n < 0.8 * len(texts))
    # A row's last word and its first new token: a match across the prompt's end.
    at = next(i for i, new in enumerate(first) if len(new) > 2 and common not in new)
    across = f"{texts[at].split()[-1]} {first[at][0]}"
    stops = [common, across]
    rows, summary = run_job(tmp_path / "out", model=path, inputs=corpus["parquet"],
                            task="generate", id_column="doc", max_new_tokens=NEW,
                            stop=tuple(stops))  # fmt: skip
    for i, text in enumerate(texts):
        got = rows[f"doc-{i:03d}"]
        want = alone(model, tok, text, stops)
        assert {k: got[k] for k in want} == want, i
    reasons = Counter(r["finish_reason"] for r in rows.values())
    assert reasons["stop"] >= 10 and reasons["length"] >= 10, reasons
    assert summary.finished == reasons  # counted from the output, as errors are
    cut = f"finished length {reasons['length']}, stop {reasons['stop']} "
    assert f"{cut}({reasons['length']} rows ran out of --max-new-tokens)" in (
        summary.lines()
    )
    assert not any(common in r["generated_text"] for r in rows.values())
    assert rows[f"doc-{at:03d}"]["generated_tokens"] > 1


def test_an_end_of_text_token_ends_a_row_and_counts(gpt2, corpus, tmp_path):
    """The generation config's eos: the row's one token, its text empty, stopped;
    the memory probe's head runs every row to --max-new-tokens regardless."""
    path = tmp_path / "model"
    shutil.copytree(gpt2, path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tok(corpus["texts"][1], return_tensors="pt")["input_ids"]
    eos = int(greedy(model, tok, ids, 1)[0])
    model.generation_config.eos_token_id = eos
    head = Generate(NEW, tok, end_ids(model, tok))
    with torch.inference_mode():
        out = head(model, ids, torch.ones_like(ids))
        probe = Generate(NEW, tok, end_ids(model, tok), full_length=True)
        assert probe(model, ids, torch.ones_like(ids))["tokens"].shape[1] == NEW
    host = {k: v.numpy() for k, v in out.items()}
    assert head.columns(host)["finish_reason"].tolist() == ["stop"]
    assert host["lengths"].tolist() == [1] and host["ended"].tolist() == [True]
    model.generation_config.save_pretrained(path)
    rows, _ = run_job(tmp_path / "out", model=str(path), inputs=corpus["parquet"],
                      task="generate", id_column="doc", max_new_tokens=NEW)  # fmt: skip
    row = rows["doc-001"]
    assert (row["generated_tokens"], row["finish_reason"]) == (1, "stop")
    assert row["generated_text"] == tok.decode([eos], skip_special_tokens=True)


def test_stop_flags_are_checked_before_ray_starts(gpt2, tiny_models, corpus, tmp_path):
    base = ["infer", "--input", corpus["parquet"], "--output", str(tmp_path / "o")]
    runner = CliRunner()
    on_embed = [*base, "--model", tiny_models["bert"], "--task", "embed"]
    assert_user_error(runner.invoke(cli, [*on_embed, "--stop", "x"]),
                      "--stop", "applies to --task generate")  # fmt: skip
    generate = [*base, "--model", gpt2, "--task", "generate"]
    assert_user_error(runner.invoke(cli, [*generate, "--stop", ""]),
                      "--stop", "empty string")  # fmt: skip
    word_level = [*base, "--model", tiny_models["gpt2"], "--task", "generate"]
    assert_user_error(runner.invoke(cli, [*word_level, "--stop", "the"]),
                      "--stop", "cannot match stop strings")  # fmt: skip
    dry = runner.invoke(cli, [*generate, "--stop", "the", "--stop", "\n", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "stops at 'the', '\\n'" in dry.output


def test_resume_with_other_stop_strings_is_refused(gpt2, corpus, tmp_path):
    flags = dict(model=gpt2, inputs=corpus["parquet"],
                 task="generate", max_new_tokens=2, stop=("the",))  # fmt: skip
    run_job(tmp_path / "out", **flags)
    with pytest.raises(UserError, match="another --stop"):
        run_job(tmp_path / "out", resume=True, **{**flags, "stop": ("a",)})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.usefixtures("ray_local")
def test_stop_strings_end_rows_on_cuda_as_on_cpu(gpt2, corpus, tmp_path):
    """The matcher and each row's end run on the device: in fp32 on a GPU the rows
    end where they end on the CPU (a near tie of the two devices' logits aside)."""
    flags = dict(model=gpt2, inputs=corpus["parquet"], task="generate",
                 id_column="doc", max_new_tokens=NEW, stop=("do", "some some"),
                 precision="fp32")  # fmt: skip
    cpu, _ = run_job(tmp_path / "cpu", device="cpu", **flags)
    gpu, summary = run_job(tmp_path / "gpu", device="cuda", **flags)
    assert all(r.startswith("cuda (") for r in summary.ran), summary.ran
    assert sum(gpu[k] == cpu[k] for k in cpu) >= 0.9 * len(cpu)
    assert {r["finish_reason"] for r in gpu.values()} == {"stop", "length"}
