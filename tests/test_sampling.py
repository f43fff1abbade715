"""Sampled generation (``--temperature``, ``--top-k``, ``--top-p``, ``--seed``): draws
from the model's softmax, the same text for a row in any batch and on any run, so a
retried or resumed batch writes what the first try would have."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from helpers import run_job
from test_cli_errors import assert_user_error
from test_serve import post, serving

from lmbatch.actors.draws import RowDraw, sampling_processors, uniform
from lmbatch.actors.sampling import Sampling, row_keys
from lmbatch.errors import UserError
from lmbatch.jobs.cli import cli

ROWS = 40
SERVED = ["the water is long", "a", "one day they could see the oil", "he was here"]


def test_a_rows_stream_is_its_own_and_uniform():
    keys = torch.from_numpy(row_keys(["a", "b", "a"]))
    u = uniform(keys, 0, 3, 50_000)
    assert torch.equal(u[0], u[2]) and not torch.equal(u[0], u[1])
    assert not torch.equal(u[0], uniform(keys, 1, 3, 50_000)[0])  # another seed
    assert torch.equal(u[0, 1:], uniform(keys, 0, 4, 49_999)[0])  # one stream
    assert 0 < u.min() and u.max() < 1
    counts = torch.histc(u[:2], bins=10, min=0, max=1)
    assert (counts - 10_000).abs().max() < 500  # 10,000 a bin, give or take 5 sd


def test_the_draws_follow_the_softmax():
    """40,000 rows' own draws, against softmax(logits / T)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    keys = torch.from_numpy(row_keys([f"row-{i}" for i in range(40_000)]))
    for temperature in (1.0, 0.5):
        scores = logits.expand(len(keys), 5) / temperature
        drawn = RowDraw(keys, 7, 0)(torch.zeros(len(keys), 0), scores).argmax(-1)
        freq = torch.bincount(drawn, minlength=5) / len(keys)
        want = (logits / temperature).softmax(-1)[0]
        assert (freq - want).abs().max() < 0.01, (freq, want)


def test_top_k_and_top_p_draw_only_from_the_likeliest():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).expand(2_000, 5)
    keys = torch.from_numpy(row_keys([str(i) for i in range(2_000)]))
    ids = torch.zeros(2_000, 0, dtype=torch.long)
    for sampling, allowed in ((Sampling(1.0, top_k=2), {0, 1}),
                              (Sampling(1.0, top_p=0.6), {0, 1})):  # fmt: skip
        drawn = sampling_processors(sampling, keys, 0)(ids, logits.clone()).argmax(-1)
        assert set(drawn.tolist()) == allowed


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("prompts")
    texts = ["the water is long", "one day they could", "he was", "a word"] * 10
    keys = [f"p{i:02d}" for i in range(ROWS)]
    pq.write_table(pa.table({"k": keys, "text": texts}), root / "p.parquet")
    return str(root / "p.parquet")


@pytest.mark.usefixtures("ray_local")
def test_a_row_draws_the_same_text_in_any_batch(tiny_models, prompts, tmp_path):
    """Batches of 40 rows and of 3, an actor's micro-batches of a few tokens: the
    same texts; the same prompt under another id draws its own; another seed,
    other texts; a vanishing temperature, the greedy ones."""
    flags = dict(model=tiny_models["llama"], inputs=prompts, task="generate",
                 id_column="k", max_new_tokens=6)  # fmt: skip
    whole, _ = run_job(tmp_path / "whole", temperature=1.0, seed=3, **flags)
    small, _ = run_job(tmp_path / "small", temperature=1.0, seed=3, batch_rows=3,
                       batch_tokens=40, **flags)  # fmt: skip
    texts = {k: r["generated_text"] for k, r in whole.items()}
    assert texts == {k: r["generated_text"] for k, r in small.items()}
    assert len({texts[f"p{i:02d}"] for i in range(0, ROWS, 4)}) > 3  # one prompt
    other, _ = run_job(tmp_path / "other", temperature=1.0, seed=4, **flags)
    assert sum(texts[k] != other[k]["generated_text"] for k in texts) > ROWS // 2
    greedy, _ = run_job(tmp_path / "greedy", **flags)
    cold, _ = run_job(tmp_path / "cold", temperature=1e-4, **flags)
    assert all(cold[k]["generated_text"] == greedy[k]["generated_text"] for k in texts)
    with pytest.raises(UserError, match="another --temperature, --top-k, --top-p"):
        run_job(tmp_path / "whole", temperature=1.0, seed=5, resume=True, **flags)


@pytest.mark.usefixtures("ray_local")
def test_the_dry_run_says_how_it_samples(tiny_models, prompts, tmp_path):
    from lmbatch.jobs.run import run_job as launch
    from lmbatch.jobs.spec import InferSpec

    spec = InferSpec(model=tiny_models["llama"], inputs=(prompts,), task="generate",
                     temperature=0.7, top_k=40, top_p=0.9, seed=3, dry_run=True,
                     output=str(tmp_path / "out"))  # fmt: skip
    lines = launch("infer", spec, None)
    assert "sampled at temperature 0.7, top-k 40, top-p 0.9, seed 3" in lines


def test_sampling_flag_mistakes_are_one_line(tiny_models, prompts, tmp_path):
    base = ["infer", "--model", tiny_models["llama"], "--input", prompts,
            "--output", str(tmp_path / "out")]  # fmt: skip
    for flags, where, says in (
        (["--task", "generate", "--top-p", "0.9"], "--top-p", "needs --temperature"),
        (["--task", "generate", "--seed", "2"], "--seed", "needs --temperature"),
        (["--task", "score", "--temperature", "1"], "--temperature",
         "applies to --task generate"),
        (["--task", "generate", "--temperature", "-1"], "--temperature", "0"),
    ):  # fmt: skip
        assert_user_error(CliRunner().invoke(cli, [*base, *flags]), where, says)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.usefixtures("ray_local")
def test_sampled_generation_on_cuda_draws_as_on_cpu(tiny_models, prompts, tmp_path):
    """The row's stream and its draw run on the device: in fp32 on a GPU the rows
    draw what they draw on the CPU (a near tie of the two devices' logits aside),
    and the same in any batch there too."""
    flags = dict(model=tiny_models["llama"], inputs=prompts, task="generate",
                 id_column="k", max_new_tokens=6, temperature=1.0, seed=3,
                 precision="fp32")  # fmt: skip
    cpu, _ = run_job(tmp_path / "cpu", device="cpu", **flags)
    gpu, summary = run_job(tmp_path / "gpu", device="cuda", **flags)
    assert all(r.startswith("cuda (") for r in summary.ran), summary.ran
    small, _ = run_job(tmp_path / "small", device="cuda", batch_rows=3, **flags)
    texts = {k: r["generated_text"] for k, r in gpu.items()}
    assert texts == {k: r["generated_text"] for k, r in small.items()}
    same = sum(texts[k] == cpu[k]["generated_text"] for k in texts)
    assert same >= 0.9 * ROWS, same


@pytest.mark.usefixtures("ray_local")
def test_a_sampling_endpoint_draws_as_a_job_does(tiny_models, tmp_path):
    """An input draws what a job's row draws whose id is the input (with the
    request's seed, where it gives one): the same text on every request, another
    with another seed. (Here, not in test_serve.py: its module's endpoint holds a
    CPU of the test's Ray, and the job needs both.)"""
    flags = {"max_new_tokens": 6, "temperature": 1.0, "seed": 3}

    def key(text: str, seed: int | None) -> str:
        return json.dumps(text if seed is None else [text, seed])

    keyed = [(key(t, seed), t) for t in SERVED for seed in (None, 5, 6)]
    ids, texts = zip(*keyed, strict=True)
    pq.write_table(pa.table({"k": ids, "text": texts}), tmp_path / "t.pq")
    rows, _ = run_job(tmp_path / "out", model=tiny_models["llama"], inputs=str(
        tmp_path / "t.pq"), task="generate", id_column="k", **flags)  # fmt: skip
    drawn = {k: r["generated_text"] for k, r in rows.items()}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    with serving("--model", tiny_models["llama"], "--task", "generate", *args) as url:
        for seed in (None, 5, 6, None):
            body = {"inputs": SERVED, **({} if seed is None else {"seed": seed})}
            status, answer = post(url, body)
            assert status == 200, answer
            got = [r["generated_text"] for r in answer["results"]]
            assert got == [drawn[key(t, seed)] for t in SERVED], seed
        status, answer = post(url, {"inputs": SERVED, "seed": -1})
        assert status == 400 and "seed must be a whole number" in answer["error"]
    by_seed = [[drawn[key(t, s)] for t in SERVED] for s in (None, 5, 6)]
    assert len({tuple(texts) for texts in by_seed}) == 3
