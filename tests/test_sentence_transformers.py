"""sentence-transformers models, built with its own classes from a tiny BERT: for every
module combination lmbatch runs, its embeddings equal ``SentenceTransformer.encode``;
anything else is refused with one line naming the module."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import sentences
from helpers import run_job
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer import modules as st

from lmbatch.actors.loading import load_model
from lmbatch.actors.model_info import ModelSpec, inspect_model
from lmbatch.actors.predict import PredictorConfig
from lmbatch.actors.predictor import Predictor
from lmbatch.actors.sentence import resolve_prompt
from lmbatch.actors.tasks import pack_signs
from lmbatch.actors.tokenize import TokenizeConfig, actor_batch, load_tokenizer
from lmbatch.errors import UserError
from lmbatch.jobs.spec import InferSpec, check_task_flags, max_length_of
from lmbatch.optimize.calibrate import make_batches
from lmbatch.optimize.context import Context, embed_head
from lmbatch.optimize.evaluate import fidelity

# Mixed case, and long enough that max_seq_length cuts some of them.
TEXTS = [t.upper() if i % 3 == 0 else t for i, t in enumerate(sentences(24, seed=5))]
TEXTS += ["the WATER is long", "the water is long"]
WIDE = 32 * 2  # hidden 32, two pooling modes


def build(root, name, tiny_models, modules, max_seq_length=None, lowercase=False):
    """Save ``Transformer + modules`` with sentence-transformers; return its dir."""
    transformer = st.Transformer(
        tiny_models["bert"], max_seq_length=max_seq_length, do_lower_case=lowercase
    )
    model = SentenceTransformer(modules=[transformer, *modules(transformer)])
    path = root / name
    model.save(str(path))
    return str(path)


COMBINATIONS = {
    **{
        mode: lambda t, m=mode: [st.Pooling(32, pooling_mode=m)]
        for mode in (
            "cls",
            "max",
            "mean",
            "mean_sqrt_len_tokens",
            "weightedmean",
            "lasttoken",
        )
    },  # fmt: skip
    "cls+max, normalized": lambda t: [
        st.Pooling(32, pooling_mode=("cls", "max")),
        st.Normalize(),
    ],
    "mean, dense tanh, normalized": lambda t: [
        st.Pooling(32, pooling_mode="mean"),
        st.Dense(32, 16, activation_function=torch.nn.Tanh()),
        st.Normalize(),
    ],
    "weightedmean+lasttoken, two dense": lambda t: [
        st.Pooling(32, pooling_mode=("weightedmean", "lasttoken")),
        st.Dense(WIDE, 24, activation_function=torch.nn.GELU()),
        st.Dense(24, 8, bias=False, activation_function=torch.nn.Identity()),
    ],
    "dense with a residual": lambda t: [
        st.Pooling(32, pooling_mode="max"),
        st.Dense(32, 32, activation_function=torch.nn.ReLU(), use_residual=True),
    ],
}


@pytest.fixture(scope="module")
def st_models(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("st")
    made = {
        name: build(root, name.replace(" ", "_"), tiny_models, modules)
        for name, modules in COMBINATIONS.items()
    }
    made["lowercase, 12 tokens"] = legacy_lowercase(root, tiny_models)
    return made


def legacy_lowercase(root, tiny_models) -> str:
    """An older layout: sentence_bert_config.json holds max_seq_length and
    do_lower_case, the Pooling config one flag per mode, module types under
    sentence_transformers.models."""
    path = build(
        root, "legacy", tiny_models, lambda t: [st.Pooling(32, pooling_mode="mean")]
    )
    (root / "legacy" / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 12, "do_lower_case": True})
    )
    (root / "legacy" / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
    )
    listing = root / "legacy" / "modules.json"
    modules = json.loads(listing.read_text())
    for m, kind in zip(modules, ["Transformer", "Pooling"], strict=True):
        m["type"] = f"sentence_transformers.models.{kind}"
    listing.write_text(json.dumps(modules))
    return path


def lmbatch_embeddings(path: str) -> np.ndarray:
    info = inspect_model(path, "embed")
    max_length = max_length_of(InferSpec(model=path, inputs=("x",), task="embed",
                                         output="o"), info)  # fmt: skip
    actor = Predictor(
        PredictorConfig(ModelSpec(path, "embed"), info, max_length=max_length)
    )
    tokens = TokenizeConfig(path, max_length, lowercase=info.sentence.lowercase)
    out = actor(actor_batch(TEXTS, tokens))
    assert out["error"].null_count == len(TEXTS)
    return np.array(out["embedding"].to_pylist(), dtype=np.float32)


@pytest.mark.parametrize("name", [*COMBINATIONS, "lowercase, 12 tokens"])
def test_embeddings_equal_sentence_transformers(name, st_models):
    path = st_models[name]
    want = SentenceTransformer(path, device="cpu").encode(TEXTS, batch_size=7)
    got = lmbatch_embeddings(path)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_lowercasing_and_the_length_limit_are_honoured(st_models):
    got = lmbatch_embeddings(st_models["lowercase, 12 tokens"])
    np.testing.assert_array_equal(got[-2], got[-1])  # "WATER" is "water"
    info = inspect_model(st_models["lowercase, 12 tokens"], "embed")
    assert (info.sentence.max_seq_length, info.sentence.lowercase) == (12, True)


@pytest.mark.usefixtures("ray_local")
def test_a_whole_job_matches_too(st_models, corpus, tmp_path):
    path = st_models["mean, dense tanh, normalized"]
    rows, _ = run_job(
        tmp_path / "out", model=path, inputs=corpus["parquet"], task="embed",
        id_column="doc",
    )  # fmt: skip
    want = SentenceTransformer(path, device="cpu").encode(corpus["texts"])
    got = np.array([rows[f"doc-{i:03d}"]["embedding"] for i in range(120)])
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.usefixtures("ray_local")
def test_a_dense_module_kept_as_a_pickle_runs_with_allow_pickle(
    st_models, corpus, tmp_path
):
    """Older models keep a Dense module's weights as pytorch_model.bin, which
    sentence-transformers loads; lmbatch loads them where --allow-pickle trusts
    them (tensors only), and refuses them in one line otherwise."""
    from safetensors.torch import load_file

    path = tmp_path / "older"
    shutil.copytree(st_models["mean, dense tanh, normalized"], path)
    (dense,) = [p.parent for p in path.glob("*/model.safetensors")]
    torch.save(load_file(dense / "model.safetensors"), dense / "pytorch_model.bin")
    (dense / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"pytorch_model\.bin\); pass --allow-pickle"):
        inspect_model(str(path), "embed")
    rows, _ = run_job(tmp_path / "out", model=str(path), inputs=corpus["parquet"],
                      task="embed", id_column="doc", allow_pickle=True)  # fmt: skip
    want = SentenceTransformer(str(path), device="cpu").encode(corpus["texts"])
    got = np.array([rows[f"doc-{i:03d}"]["embedding"] for i in range(120)])
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


PROMPTS = {"query": "the query: ", "doc": "a passage: "}


@pytest.fixture(scope="module")
def prompted(tiny_models, tmp_path_factory) -> dict[bool, str]:
    """include_prompt -> a model with prompts, "query" its default, pooling mean and
    last token (the prompt left out of the mean, or not)."""
    root = tmp_path_factory.mktemp("prompted")
    made = {}
    for include in (True, False):
        pooling = st.Pooling(32, pooling_mode=("mean", "lasttoken"),
                             include_prompt=include)  # fmt: skip
        model = SentenceTransformer(
            modules=[st.Transformer(tiny_models["bert"]), pooling],
            prompts=PROMPTS, default_prompt_name="query",
        )  # fmt: skip
        model.save(str(root / str(include)))
        made[include] = str(root / str(include))
    return made


@pytest.mark.parametrize("include", [True, False])
@pytest.mark.parametrize(
    "prompt, name",
    [(None, None), (None, "doc"), ("some words: ", None), ("", None)],
)
def test_prompts_as_sentence_transformers_applies_them(prompted, include, prompt, name):
    path = prompted[include]
    info = inspect_model(path, "embed")
    text = resolve_prompt(info.sentence, prompt, name)
    actor = Predictor(
        PredictorConfig(ModelSpec(path, "embed"), info, max_length=64, prompt=text)
    )
    out = actor(actor_batch(TEXTS, TokenizeConfig(path, 64, prefix=text)))
    got = np.array(out["embedding"].to_pylist(), dtype=np.float32)
    model = SentenceTransformer(path, device="cpu")
    want = model.encode(TEXTS, prompt=prompt, prompt_name=name, batch_size=7)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    if prompt != "":  # the prompt changed the vectors: the test can tell
        plain = model.encode(TEXTS, prompt="", batch_size=7)
        assert not np.allclose(got, plain, atol=1e-3)


def test_a_prompt_the_model_lacks_is_one_line(prompted):
    info = inspect_model(prompted[True], "embed")
    with pytest.raises(UserError) as e:
        resolve_prompt(info.sentence, None, "passage")
    assert e.value.where == "--prompt-name"
    assert str(e.value) == (
        "--prompt-name: the model has no prompt 'passage' (it has ['doc', 'document', "
        "'query'])"
    )
    spec = InferSpec(model=prompted[True], inputs=("x",), task="score", output="o",
                     prompt="q: ")  # fmt: skip
    with pytest.raises(UserError, match="--prompt: applies to --task embed"):
        check_task_flags(spec, info)


@pytest.mark.usefixtures("ray_local")
def test_a_job_with_a_prompt_name_matches_and_resumes_only_with_it(
    prompted, corpus, tmp_path
):
    flags = dict(model=prompted[False], inputs=corpus["parquet"], task="embed",
                 id_column="doc")  # fmt: skip
    rows, _ = run_job(tmp_path / "out", prompt_name="doc", **flags)
    model = SentenceTransformer(prompted[False], device="cpu")
    want = model.encode(corpus["texts"], prompt_name="doc")
    got = np.array([rows[f"doc-{i:03d}"]["embedding"] for i in range(120)])
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    with pytest.raises(UserError, match="another --prompt or --prompt-name"):
        run_job(tmp_path / "out", resume=True, **flags)  # the default prompt: query


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("normalize", [False, True])
def test_truncate_dim_keeps_the_first_dimensions_as_sentence_transformers(
    normalize, st_models, corpus, tmp_path
):
    """The first 8 dimensions, not normalised again; with --normalize, normalised
    after the cut, as normalize_embeddings does."""
    path = st_models["mean, dense tanh, normalized"]  # 16 dimensions
    rows, _ = run_job(tmp_path / "out", model=path, inputs=corpus["parquet"],
                      task="embed", id_column="doc", truncate_dim=8,
                      normalize=normalize)  # fmt: skip
    want = SentenceTransformer(path, device="cpu").encode(
        corpus["texts"], truncate_dim=8, normalize_embeddings=normalize
    )
    got = np.array([rows[f"doc-{i:03d}"]["embedding"] for i in range(120)])
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    schema = pq.read_schema(next((tmp_path / "out").glob("*.parquet")))
    assert schema.field("embedding").type == pa.list_(pa.float32(), 8)
    with pytest.raises(
        UserError, match="--truncate-dim: 17 is more than the model's 16"
    ):
        run_job(tmp_path / "more", model=path, inputs=corpus["parquet"],
                task="embed", truncate_dim=17)  # fmt: skip


@pytest.mark.parametrize("width", [16, 13, 3])
def test_signs_pack_as_numpy_packbits(width):
    x = torch.randn(50, width)
    x[0, :2] = 0.0  # 0 is not above 0
    bits = np.packbits(x.numpy() > 0, axis=-1)
    np.testing.assert_array_equal(pack_signs(x, signed=False).numpy(), bits)
    signed = pack_signs(x, signed=True).numpy()
    np.testing.assert_array_equal(signed, (bits.astype(np.int16) - 128))
    assert signed.dtype == np.int8


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("precision", ["binary", "ubinary"])
def test_binary_embeddings_are_sentence_transformers_own(
    precision, st_models, tiny_models, corpus, tmp_path
):
    """encode(precision=...) packs the vectors a user gets: after the Dense module,
    --truncate-dim (12 dimensions: the last byte half used) and --normalize."""
    path = st_models["mean, dense tanh, normalized"]
    rows, _ = run_job(tmp_path / "out", model=path, inputs=corpus["parquet"],
                      task="embed", id_column="doc", truncate_dim=12,
                      normalize=True, embedding_precision=precision)  # fmt: skip
    want = SentenceTransformer(path, device="cpu").encode(
        corpus["texts"], truncate_dim=12, normalize_embeddings=True,
        precision=precision,
    )  # fmt: skip
    got = np.array([rows[f"doc-{i:03d}"]["embedding"] for i in range(120)])
    np.testing.assert_array_equal(got, want)
    value = pa.int8() if precision == "binary" else pa.uint8()
    schema = pq.read_schema(next((tmp_path / "out").glob("*.parquet")))
    assert schema.field("embedding").type == pa.list_(value, 2)
    with pytest.raises(UserError, match="--embedding-precision: applies to --task"):
        run_job(tmp_path / "score", model=tiny_models["gpt2"],
                inputs=corpus["parquet"], task="score",
                embedding_precision=precision)  # fmt: skip


def test_optimize_measures_the_vectors_a_user_gets(st_models, tmp_path):
    """Doubling the last token states leaves the pooled vectors' directions as they
    were, but not what the Dense module and its tanh make of them: fidelity must
    see that, as sentence-transformers itself would."""
    path = st_models["mean, dense tanh, normalized"]
    spec = ModelSpec(path, "embed")
    teacher = load_model(spec)
    tokenizer = load_tokenizer(path)
    batches = make_batches(tokenizer, TEXTS, 64, 8)
    ctx = Context(
        teacher, tokenizer, embed_head(spec, teacher),
        calibration=TEXTS, batches=batches, eval_batches=batches, base=spec,
    )  # fmt: skip
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        norm = student.encoder.layer[-1].output.LayerNorm
        norm.weight.mul_(2)
        norm.bias.mul_(2)
    got = fidelity(student, ctx, batches)

    changed = tmp_path / "student"
    shutil.copytree(path, changed)
    student.save_pretrained(changed)  # the Transformer module sits at the root
    a = SentenceTransformer(path, device="cpu").encode(TEXTS)
    b = SentenceTransformer(str(changed), device="cpu").encode(TEXTS)
    cosines = (a * b).sum(axis=1)  # both normalized by the model's Normalize
    assert cosines.mean() < 0.999, "the change must show after the Dense module"
    assert got["cosine"] == pytest.approx(float(cosines.mean()), abs=1e-5)
    assert got["min_cosine"] == pytest.approx(float(cosines.min()), abs=1e-5)


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda d: _module(d, "sentence_transformers.models.LayerNorm"), "LayerNorm"),
        (lambda d: _module(d, "my_package.MyPooling"), "my_package.MyPooling"),
        (lambda d: _pooling(d, {"pooling_mode": "median"}), "pooling ['median']"),
        (
            lambda d: _dense_activation(d, "torch.nn.modules.activation.Softmax"),
            "activation torch.nn.modules.activation.Softmax",
        ),
    ],  # fmt: skip
)
def test_what_lmbatch_cannot_run_is_refused_naming_the_module(
    change, named, st_models, tmp_path
):
    path = tmp_path / "model"
    shutil.copytree(st_models["mean, dense tanh, normalized"], path)
    change(path)
    with pytest.raises(UserError) as e:
        inspect_model(str(path), "embed")
    assert e.value.where == "--model" and named in e.value.message
    assert "modules.json: module" in e.value.message


def _module(path, kind: str) -> None:
    listing = json.loads((path / "modules.json").read_text())
    listing.append({"idx": 9, "name": "9", "path": "9_X", "type": kind})
    (path / "modules.json").write_text(json.dumps(listing))


def _pooling(path, config: dict) -> None:
    (path / "1_Pooling" / "config.json").write_text(json.dumps(config))


def _dense_activation(path, name: str) -> None:
    file = path / "2_Dense" / "config.json"
    config = json.loads(file.read_text())
    config["activation_function"] = name
    file.write_text(json.dumps(config))
