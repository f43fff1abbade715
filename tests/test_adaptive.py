"""The adaptive batcher inside real actors: injected OOMs, memory limits, precisions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import sentences
from helpers import run_job

from lmbatch.actors.batching import probe_budget
from lmbatch.actors.memory import (
    CpuMemory,
    activation_floor,
    anonymous_rss,
    cpu_share,
    release_freed,
    rss,
)
from lmbatch.actors.model_info import ModelSpec, inspect_model
from lmbatch.actors.predict import PredictorConfig
from lmbatch.actors.predictor import Predictor
from lmbatch.actors.tokenize import TokenizeConfig, tokenize_batch
from lmbatch.errors import UserError
from lmbatch.jobs.summary import Summary


def tokenized(model: str, texts: list[str]) -> pa.Table:
    """A batch as the actor receives it from the tokenize stage."""
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(len(texts))],
            "_text": texts,
            "_error": pa.nulls(len(texts), pa.string()),
        }
    )
    return tokenize_batch(table, TokenizeConfig(model_path=model, max_length=64))


def predictor(model: str, **kw) -> Predictor:
    info = inspect_model(model, "embed", trust_remote_code=True)
    spec = ModelSpec(model, "embed", trust_remote_code=True)
    return Predictor(PredictorConfig(spec, info, max_length=64, **kw))


@pytest.mark.usefixtures("ray_local")
@pytest.mark.fault("out-of-memory in an actor: batch halved, rows retried")
def test_injected_oom_in_a_real_job_loses_no_row(
    tiny_models, corpus, tmp_path, fault_report
):
    rows, summary = run_job(
        tmp_path / "out",
        model=tiny_models["oom_150"],
        inputs=corpus["parquet"],
        task="embed",
        id_column="doc",
        trust_remote_code=True,
        batch_rows=120,
    )
    assert len(rows) == 120 and summary.rows == 120 and summary.errors == {}
    (actor,) = summary.actors
    assert actor["ooms"] >= 1
    assert actor["budget_history"][-1] <= 150  # converged under the threshold
    assert actor["max_rows"] * 2 <= 150  # and every micro-batch that ran fitted it
    ids = pq.read_table(tmp_path / "out", columns=["id"])["id"].to_pylist()
    fault_report(120, ids, actor["rows_started"], ooms=actor["ooms"])


def test_actors_with_different_limits_settle_at_different_budgets(tiny_models):
    batch = tokenized(tiny_models["bert"], sentences(200, seed=3))
    small, large = predictor(tiny_models["oom_150"]), predictor(tiny_models["oom_600"])
    for actor in (small, large):
        for _ in range(3):
            out = actor(batch)
            assert out.num_rows == 200 and out["error"].null_count == 200
    assert small.budget.tokens <= 150 < large.budget.tokens <= 600
    assert small.budget.ooms >= 1 and large.budget.ooms >= 1


def test_cpu_memory_limit_sizes_the_first_budget(tiny_models):
    actor = predictor(tiny_models["bert"])
    floor = activation_floor(32, 4)
    budgets = []
    for headroom in (256 << 10, 1 << 20):
        release_freed()  # as the probe will: the headroom over what is held
        memory = CpuMemory(rss() + headroom)
        budgets.append(probe_budget(memory, actor._probe, "cpu", floor, 64).tokens)
    assert budgets[0] < budgets[1]
    assert budgets[0] <= (256 << 10) / floor


def test_freed_heap_pages_do_not_shrink_the_budget(tiny_models):
    """glibc keeps memory freed between batches resident; near its limit an actor
    hands it back before measuring (malloc_trim), else the batch looked over the
    limit: the budget halved to a row a batch, or the actor seemed to hold more
    than its limit and stopped the job."""
    batch = tokenized(tiny_models["bert"], sentences(50))
    release_freed()
    limit = rss() + (200 << 20)
    pins = [resident_garbage(limit)]  # as loading a model can leave
    actor = predictor(tiny_models["bert"], memory_limit=limit)
    assert actor.budget.tokens > 1  # probed, not taken for an actor without room
    actor(batch)
    budget = actor.budget.tokens
    pins.append(resident_garbage(limit))  # as a batch's tensors leave
    out = actor(batch)
    assert out["error"].null_count == 50
    assert actor.budget.tokens == budget and actor.budget.ooms == 0
    assert rss() < limit


def resident_garbage(total: int) -> np.ndarray:
    """``total`` bytes freed but still resident (glibc keeps them), pinned under a
    chunk still in use at the heap's top, which free() alone cannot shrink past."""
    chunk = (64 << 10) // 8  # 64 KiB of float64: from the heap, not mmap
    freed = [np.ones(chunk) for _ in range(total // (64 << 10))]
    pin = np.ones(chunk)
    del freed
    assert rss() > total
    return pin


@pytest.mark.parametrize(
    "limit, where, says",
    [
        ({"memory_limit": 64 << 20}, "--actor-memory", "64 MiB is less than"),
        (
            {"actors_per_node": 1_000_000, "share_flag": "--actors"},
            "--actors",
            "1000000 actors a node leave",
        ),
        (
            {"actors_per_node": 1_000_000, "share_flag": "--replicas"},
            "--replicas",
            "1000000 replicas a node leave",
        ),
        # optimize measures in its own process: no flag of its shares the machine
        ({"actors_per_node": 1_000_000}, "--model", "the "),
    ],
)
def test_an_actor_holding_more_than_its_limit_says_which_flag(
    tiny_models, limit, where, says
):
    actor = predictor(tiny_models["bert"], **limit)
    with pytest.raises(UserError) as e:
        actor(tokenized(tiny_models["bert"], sentences(5)))
    assert e.value.where == where and e.value.message.startswith(says), e.value
    assert "holds between batches" in e.value.message
    # only infer's actors have a size to give (serve's replicas, optimize: none)
    sized = where in ("--actor-memory", "--actors")
    assert ("--actor-memory" in e.value.message) == sized, e.value


def test_actors_that_fit_a_node_together_each_get_their_share():
    gib = 1 << 30
    # 4 actors of 0.5 GiB on a node with 4 GiB for them (Ray's memory for it): all
    # loaded, 2 GiB is free. Counted as not free and as held, each actor's model left
    # it a share of 0.5 GiB, no more than it holds: no room for a batch.
    assert cpu_share(free=2 * gib, held=gib // 2, node_memory=4 * gib, actors=4) == gib
    # Only this one loaded: the others' models are not counted as free.
    assert cpu_share(7 * gib // 2, gib // 2, 4 * gib, 4) == gib
    # Other processes took memory since Ray started: what is free bounds it.
    assert cpu_share(gib, gib // 2, 4 * gib, 4) == 3 * gib // 4
    # No Ray (an optimize job's measurement): this process alone.
    assert cpu_share(2 * gib, gib, None, 1) == 3 * gib
    # What the process holds: its own pages, a fresh array's among them.
    before = anonymous_rss()
    held = np.ones(64 << 17)  # 64 MiB
    assert anonymous_rss() - before >= 60 << 20 and held.all()


def test_fixed_batch_tokens_are_kept(tiny_models):
    actor = predictor(tiny_models["bert"], batch_tokens=100)
    actor(tokenized(tiny_models["bert"], sentences(50)))
    assert actor.budget.history == [100] and actor.stats.max_rows * 6 <= 100


@pytest.fixture(scope="module")
def bert64_job(ray_local, tiny_models, corpus, tmp_path_factory):
    """precision -> (rows, summary) of the wide BERT's embed job on the corpus, each
    precision run once for the module: the fp32 ("auto" on a CPU) reference every
    precision is compared with, and the quantised-at-load rows a stored checkpoint
    must equal. A job is most of a test's time (its actor's start-up)."""
    root = tmp_path_factory.mktemp("bert64")
    done: dict[str, tuple[dict, Summary]] = {}

    def job(precision: str) -> tuple[dict, Summary]:
        if precision not in done:
            done[precision] = run_job(
                root / precision, model=tiny_models["bert64"], task="embed",
                inputs=corpus["parquet"], id_column="doc", precision=precision,
            )  # fmt: skip
        return done[precision]

    return job


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize(
    "precision, min_cosine",
    [
        ("fp16", 0.9999),
        ("bf16", 0.999),
        ("int8", 0.99),
        ("nf4", 0.95),
        ("cpu-int8", 0.98),
    ],
)
def test_every_precision_stays_close_to_fp32(precision, min_cosine, bert64_job):
    """The bound per precision: mean cosine of embeddings to fp32 over 120 rows."""
    full, _ = bert64_job("auto")
    low, summary = bert64_job(precision)
    assert summary.errors == {}
    a = np.array([full[k]["embedding"] for k in full])
    b = np.array([low[k]["embedding"] for k in full])
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.mean() >= min_cosine, cosine.mean()


def test_nf4_on_cpu_keeps_narrow_layers_in_full_precision(tiny_models):
    """Hidden 32 is narrower than bitsandbytes' 64-wide 4-bit CPU blocks."""
    import torch

    from lmbatch.actors.loading import load_model

    model = load_model(ModelSpec(tiny_models["bert"], "embed", "nf4"))
    reference = load_model(ModelSpec(tiny_models["bert"], "embed"))
    ids = torch.randint(6, 90, (2, 12))
    with torch.inference_mode():
        got = model(input_ids=ids).last_hidden_state
        want = reference(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want)  # nothing could be packed, so nothing changed


def test_nf4_on_cpu_keeps_narrow_gpt2_conv1d_layers_in_full_precision(tiny_models):
    """GPT-2's Linears are transposed ``Conv1D``s, which bitsandbytes quantises too:
    the 32-wide ones stay, the 128-wide MLP projection is packed, and it runs."""
    import bitsandbytes as bnb
    import torch
    from transformers.pytorch_utils import Conv1D

    from lmbatch.actors.loading import load_model

    model = load_model(ModelSpec(tiny_models["gpt2"], "score", "nf4"))
    block = model.transformer.h[0]
    assert isinstance(block.attn.c_attn, Conv1D)
    assert isinstance(block.mlp.c_proj, bnb.nn.Linear4bit)
    with torch.inference_mode():
        logits = model(input_ids=torch.randint(6, 90, (2, 12))).logits
    assert torch.isfinite(logits).all()


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_a_checkpoint_bitsandbytes_stored_runs_as_stored(
    method, tiny_models, corpus, bert64_job, tmp_path
):
    """A plain checkpoint saved quantised (a hub's ``*-bnb-4bit``, no lmbatch.json)
    runs in its own precision, with the values quantising at load gives; another
    --precision is refused."""
    import shutil

    from lmbatch.actors.loading import load_model
    from lmbatch.errors import UserError
    from lmbatch.jobs.gpus import planned_precision

    base = tiny_models["bert64"]
    stored = tmp_path / "stored"
    shutil.copytree(base, stored)
    load_model(ModelSpec(base, "embed", method)).save_pretrained(stored)
    info = inspect_model(str(stored), "embed")
    assert planned_precision(info, "auto", "cpu") == f"{method} (the model's own)"
    with pytest.raises(UserError, match=f"already in {method}; leave --precision out"):
        inspect_model(str(stored), "embed", precision="fp16")
    args = dict(inputs=corpus["parquet"], task="embed", id_column="doc")
    got, summary = run_job(tmp_path / "as-stored", model=str(stored), **args)
    assert summary.ran == [f"cpu in {method}"] and summary.errors == {}
    want, _ = bert64_job(method)  # the same job with --precision at load
    for key in want:
        np.testing.assert_array_equal(got[key]["embedding"], want[key]["embedding"])
