"""Each optimize step's effect is real, and its artifact reloads to the same outputs.

Steps run in memory on tiny models (no Ray); the artifact goes through ``load_model``,
the loader every infer actor uses.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import sentences
from helpers import wide_classifier
from transformers import BertConfig, BertModel, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from lmbatch.actors.layers import Int8Linear, LowRankLinear, SharedLinear
from lmbatch.actors.loading import load_model
from lmbatch.actors.model_info import ModelSpec
from lmbatch.actors.tokenize import load_tokenizer
from lmbatch.errors import UserError
from lmbatch.optimize.artifact import ArtifactMeta, save_artifact
from lmbatch.optimize.calibrate import make_batches
from lmbatch.optimize.context import Context, embed_head
from lmbatch.optimize.distill import progress_line
from lmbatch.optimize.evaluate import fidelity, sizes
from lmbatch.optimize.pipeline import APPLY, STEP_NAMES, scores_of, student_of
from lmbatch.optimize.recipe import to_steps

TASK = {"bert": "embed", "bert_cls": "classify", "llama": "score", "gpt2": "score"}


def context(path: str, task: str) -> Context:
    spec = ModelSpec(path, task)
    teacher = load_model(spec).requires_grad_(False)
    tokenizer = load_tokenizer(path)
    texts = sentences(64, seed=1)
    return Context(
        teacher=teacher,
        tokenizer=tokenizer,
        embed=embed_head(spec, teacher),
        calibration=texts,
        batches=make_batches(tokenizer, texts, 32, 16),
        eval_batches=make_batches(tokenizer, sentences(32, seed=2), 32, 16),
        base=spec,
        scores=scores_of(spec),
    )


def apply(name: str, tiny_models, recipe: list[dict]):
    return apply_at(tiny_models[name], TASK[name], recipe)


def apply_at(path: str, task: str, recipe: list[dict]):
    torch.manual_seed(0)
    ctx = context(path, task)
    model = student_of(ctx.teacher)
    for i, step in enumerate(to_steps(recipe)):
        where = f"steps[{i}].{STEP_NAMES[type(step)]}"  # as the optimize job names it
        model = APPLY[type(step)](model, step, ctx, where)
    return model.eval(), ctx


def reload(model, ctx: Context, base: str, out: Path, precision: str = "fp32"):
    from lmbatch.optimize.pipeline import _precision

    meta = ArtifactMeta(
        base_model=base,
        base_fingerprint="",
        task=ctx.task,
        recipe=[],
        precision=_precision(model, ctx),
        quantization=ctx.quantization,
    )
    save_artifact(model, out, ctx.base, meta, ctx.storage)
    return load_model(ModelSpec(str(out), ctx.task, precision=precision))


def outputs(model, ctx: Context) -> torch.Tensor:
    with torch.inference_mode():
        out = model(**ctx.eval_batches[0])
    return out.last_hidden_state if ctx.task == "embed" else out.logits


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_structured_prune_shrinks_tensors_and_reloads(name, tiny_models, tmp_path):
    recipe = [{"prune": {"method": "structured", "heads": 0.5, "ffn": 0.5}}]
    model, ctx = apply(name, tiny_models, recipe)
    assert params(model) < params(ctx.teacher)
    first = "encoder.layer.0" if name == "bert" else "model.layers.0"
    ffn_out = "output.dense" if name == "bert" else "mlp.down_proj"
    width = model.get_submodule(f"{first}.{ffn_out}").in_features
    original = ctx.teacher.get_submodule(f"{first}.{ffn_out}").in_features
    assert width == original - round(original * 0.5)
    assert model.config.intermediate_size == width
    if name == "bert":  # 2 heads of 16 -> 1
        assert model.get_submodule(f"{first}.attention.self.query").out_features == 16
    loaded = reload(model, ctx, tiny_models[name], tmp_path / "a")
    torch.testing.assert_close(outputs(loaded, ctx), outputs(model, ctx))


@pytest.mark.parametrize(
    "prune,expected",
    [
        ({"method": "magnitude", "sparsity": 0.5}, 0.5),
        ({"method": "magnitude", "sparsity": 0.3, "scope": "global"}, 0.3),
        ({"method": "activation", "sparsity": 0.6}, 0.6),
        ({"method": "magnitude", "sparsity": 0.5, "pattern": "2:4"}, 0.5),
        (
            {"method": "magnitude", "sparsity": 0.5, "rounds": 2, "finetune_steps": 3},
            0.5,
        ),
    ],
)
def test_unstructured_sparsity_is_as_asked(prune, expected, tiny_models):
    model, ctx = apply("bert", tiny_models, [{"prune": prune}])
    weights = [model.get_parameter(k) for k in ctx.masks]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    assert zeros / total == pytest.approx(expected, abs=0.03)
    if prune.get("pattern") == "2:4":
        w = model.get_parameter(next(iter(ctx.masks)))
        groups = (w[:, : w.shape[1] // 4 * 4] != 0).reshape(w.shape[0], -1, 4)
        assert (groups.sum(dim=2) <= 2).all()
    assert "same speed" in ctx.notes[-1]


def test_bitmask_storage_shrinks_the_file_and_reloads(tiny_models, tmp_path):
    dense, ctx = apply(
        "bert", tiny_models, [{"prune": {"method": "magnitude", "sparsity": 0.8}}]
    )
    reload(dense, ctx, tiny_models["bert"], tmp_path / "dense")
    packed, ctx2 = apply(
        "bert",
        tiny_models,
        [{"prune": {"method": "magnitude", "sparsity": 0.8, "storage": "bitmask"}}],
    )
    loaded = reload(packed, ctx2, tiny_models["bert"], tmp_path / "packed")
    size = lambda p: (p / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "packed") < 0.6 * size(tmp_path / "dense")
    torch.testing.assert_close(outputs(loaded, ctx2), outputs(packed, ctx2))


@pytest.mark.parametrize(
    "lowrank",
    [
        {"rank_ratio": 0.25, "min_saving": 0.0},
        {"energy": 0.9, "activation_aware": True, "min_saving": 0.0},
    ],
)
def test_lowrank_factors_reload(lowrank, tiny_models, tmp_path):
    model, ctx = apply("bert", tiny_models, [{"lowrank": lowrank}])
    factored = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert factored and params(model) < params(ctx.teacher)
    if "rank_ratio" in lowrank:
        assert all(
            m.rank == round(0.25 * min(m.in_features, m.out_features)) for m in factored
        )
    loaded = reload(model, ctx, tiny_models["bert"], tmp_path / "a")
    torch.testing.assert_close(outputs(loaded, ctx), outputs(model, ctx))


def test_lowrank_skips_layers_where_it_does_not_pay(tiny_models):
    model, ctx = apply("bert", tiny_models, [{"lowrank": {"rank_ratio": 0.9}}])
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert ctx.notes == ["0 of 12 Linears factorized"]


def test_weight_sharing_codebook_holds_and_file_shrinks(tiny_models, tmp_path):
    model, ctx = apply("llama", tiny_models, [{"share": {"clusters": 16}}])
    shared = [m for m in model.modules() if isinstance(m, SharedLinear)]
    assert shared
    for m in shared:
        assert m.codebook.numel() <= 16 and m.indices.dtype == torch.uint8
        assert len(torch.unique(m.codebook[m.indices.long()])) <= 16
    loaded = reload(model, ctx, tiny_models["llama"], tmp_path / "a")
    torch.testing.assert_close(outputs(loaded, ctx), outputs(model, ctx))
    base = Path(tiny_models["llama"]) / "model.safetensors"
    assert (tmp_path / "a" / "model.safetensors").stat().st_size < base.stat().st_size


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_distill_student_has_the_layers_asked(name, tiny_models, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lmbatch")
    model, ctx = apply(
        name, tiny_models, [{"distill": {"layers": 1, "steps": 4, "batch_size": 8}}]
    )
    # Training says where it is in lines a log keeps, not a redrawn bar: its last.
    (last,) = [r.message for r in caplog.records if "distill: step" in r.message]
    assert last.startswith("distill: step 4 of 4  loss ") and "ETA" not in last
    blocks = {
        "bert": "encoder.layer",
        "gpt2": "transformer.h",
        "llama": "model.layers",
    }[name]
    assert len(model.get_submodule(blocks)) == 1
    assert params(model) < params(ctx.teacher)
    loaded = reload(model, ctx, tiny_models[name], tmp_path / "a")
    torch.testing.assert_close(outputs(loaded, ctx), outputs(model, ctx))


def test_a_training_progress_line():
    assert progress_line("distill", 120, 300, 0.07521, 60.0) == (
        "distill: step 120 of 300  loss 0.0752  2.00 steps/s  ETA 90s"
    )


def test_a_narrower_embedding_student_is_refused(tiny_models, tmp_path):
    # The artifact keeps the teacher's pooling (and any Dense): they take its width.
    config = BertConfig.from_pretrained(tiny_models["bert"])
    config.hidden_size, config.intermediate_size = 16, 24
    BertModel(config).save_pretrained(tmp_path / "narrow")
    recipe = [{"distill": {"student": str(tmp_path / "narrow"), "steps": 1}}]
    with pytest.raises(UserError) as e:
        apply("bert", tiny_models, recipe)
    assert e.value.where == "steps[0].distill.student"
    assert "hidden size 16 differs from the teacher's 32" in e.value.message


@pytest.mark.parametrize(
    "made_by, layer",
    [
        ({"lowrank": {"rank_ratio": 0.25}}, LowRankLinear),
        ({"quantize": {"method": "fp16"}}, None),
    ],
)
def test_a_student_directory_loads_as_an_infer_job_would_load_it(
    made_by, layer, tiny_models, tmp_path
):
    # An lmbatch artifact as the student: rebuilt, a low-rank one's factors and all,
    # not given fresh random weights where its layers are not the architecture's;
    # trained in fp32 whatever it was saved in.
    made, made_ctx = apply("bert", tiny_models, [made_by])
    reload(made, made_ctx, tiny_models["bert"], tmp_path / "made")
    recipe = [{"distill": {"student": str(tmp_path / "made"), "steps": 1, "lr": 1e-8}}]
    model, ctx = apply("bert", tiny_models, recipe)
    assert layer is None or any(isinstance(m, layer) for m in model.modules())
    # its weights as saved, computed in fp32 as the student is
    torch.testing.assert_close(outputs(model, ctx), outputs(made.float(), ctx))
    teacher_at = next(ctx.teacher.parameters()).device  # where the batches are
    assert {(p.device, p.dtype) for p in model.parameters()} == {
        (teacher_at, torch.float32)
    }


def test_distill_brings_a_pruned_student_closer(tiny_models):
    student = {"layers": 1, "alpha": 1.0, "batch_size": 16}
    pruned, ctx = apply(
        "llama", tiny_models, [{"distill": {**student, "steps": 1, "lr": 1e-8}}]
    )
    before = fidelity(pruned, ctx, ctx.eval_batches)["kl"]
    healed, ctx = apply(
        "llama", tiny_models, [{"distill": {**student, "steps": 60, "lr": 1e-3}}]
    )
    assert fidelity(healed, ctx, ctx.eval_batches)["kl"] < 0.5 * before


def test_a_rerankers_outputs_are_compared_through_its_sigmoid(tiny_models, tmp_path):
    """A reranker's one output is read through a sigmoid, as infer's classify reads
    it. Compared through a softmax (1 whatever a step did), its fidelity showed
    nothing lost and its distillation loss was 0, so it learnt nothing."""
    from lmbatch.optimize.distill import distill_loss
    from lmbatch.optimize.recipe import Distill

    ctx = context(wide_classifier(tiny_models, tmp_path / "reranker", 1), "classify")
    assert ctx.scores == "sigmoid"
    student = copy.deepcopy(ctx.teacher).requires_grad_(True)
    with torch.no_grad():
        student.classifier.bias += 0.5  # every score moves; the ranking stays
    moved = fidelity(student, ctx, ctx.eval_batches)
    assert moved["kl"] > 1e-3 and moved["spearman"] == pytest.approx(1.0)
    torch.manual_seed(0)
    with torch.no_grad():
        student.classifier.weight.add_(torch.randn_like(student.classifier.weight))
    assert fidelity(student, ctx, ctx.eval_batches)["spearman"] < 0.99
    loss = distill_loss(student.train(), ctx.batches[0], Distill(), ctx)
    loss.backward()
    assert loss > 0 and student.classifier.bias.grad.abs().item() > 0


def test_label_divergence_and_ranking():
    from torch.distributions import Bernoulli, Categorical, kl_divergence

    from lmbatch.optimize.labels import divergence, label_fidelity

    ref, out = torch.randn(50, 3), torch.randn(50, 3)
    want = kl_divergence(Bernoulli(logits=ref), Bernoulli(logits=out)).sum(-1)
    torch.testing.assert_close(divergence(out, ref, "sigmoid"), want)
    want = kl_divergence(Categorical(logits=ref), Categorical(logits=out))
    torch.testing.assert_close(divergence(out, ref, "softmax"), want)
    one = ref[:, :1]
    assert label_fidelity(one, 2 * one + 1, "none") == {
        "mean_abs_diff": pytest.approx(float((one + 1).abs().mean())),
        "spearman": pytest.approx(1.0),
    }
    assert label_fidelity(one, -one, "sigmoid")["spearman"] == pytest.approx(-1.0)


@pytest.mark.parametrize(
    "quantize",
    [
        {"method": "cpu-int8"},
        {"method": "cpu-int8", "activations": "static"},
        {"method": "cpu-int8", "qat": {"steps": 3}},
        {"method": "bf16", "skip": ["*attention*"]},
    ],
)
def test_cpu_quantization_reloads_and_stays_close(quantize, tiny_models, tmp_path):
    model, ctx = apply("bert", tiny_models, [{"quantize": quantize}])
    if quantize["method"] == "cpu-int8":
        assert any(isinstance(m, Int8Linear) for m in model.modules())
    else:  # the skipped attention stays fp32, the rest is bf16: a mixed model
        assert (
            model.get_submodule("encoder.layer.0.attention.self.query").weight.dtype
            == torch.float32
        )
        assert (
            model.get_submodule(
                "encoder.layer.0.intermediate.dense"
            ).linear.weight.dtype
            == torch.bfloat16
        )
    loaded = reload(model, ctx, tiny_models["bert"], tmp_path / "a")
    torch.testing.assert_close(outputs(loaded, ctx), outputs(model, ctx))
    assert fidelity(loaded, ctx, ctx.eval_batches)["cosine"] > 0.97
    with pytest.raises(ValueError, match="--precision"):
        load_model(ModelSpec(str(tmp_path / "a"), "embed", precision="nf4"))


def test_gpt2s_conv1d_layers_are_pruned_and_stay_gpt2s_own(tiny_models, tmp_path):
    """GPT-2's blocks are Conv1D, not Linear: a prune changes them all the same, and
    the artifact stores them as GPT-2's own, a checkpoint transformers loads."""
    model, ctx = apply("gpt2", tiny_models, [{"prune": {"method": "magnitude"}}])
    assert {n.rsplit(".", 2)[-2] for n in ctx.masks} == {"c_attn", "c_proj", "c_fc"}
    loaded = reload(model, ctx, tiny_models["gpt2"], tmp_path / "a")
    assert ArtifactMeta.read(tmp_path / "a").rebuild == {}
    plain = GPT2LMHeadModel.from_pretrained(tmp_path / "a")
    weight = plain.get_submodule("transformer.h.0.mlp.c_fc").weight
    assert isinstance(plain.get_submodule("transformer.h.0.mlp.c_fc"), Conv1D)
    assert (weight == 0).float().mean() == pytest.approx(0.5, abs=0.03)
    torch.testing.assert_close(outputs(loaded, ctx), outputs(model, ctx))
    torch.testing.assert_close(outputs(plain, ctx), outputs(model, ctx))


def test_a_gpt2_student_loaded_by_distill_is_pruned_too(tiny_models):
    """A student read from its own path brings GPT-2's Conv1D back; the prune after
    it changes them as it changes the original's."""
    student = {"distill": {"student": tiny_models["gpt2"], "steps": 1}}
    _, ctx = apply("gpt2", tiny_models, [student, {"prune": {"method": "magnitude"}}])
    assert {n.rsplit(".", 2)[-2] for n in ctx.masks} == {"c_attn", "c_proj", "c_fc"}


@pytest.mark.parametrize(
    "step", [{"lowrank": {"rank_ratio": 0.5}}, {"quantize": {"method": "cpu-int8"}}]
)
def test_gpt2s_conv1d_layers_take_lmbatchs_own_layers(step, tiny_models, tmp_path):
    model, ctx = apply("gpt2", tiny_models, [step])
    kinds = {type(m) for m in model.modules()}
    assert Conv1D not in kinds and kinds & {LowRankLinear, Int8Linear}
    loaded = reload(model, ctx, tiny_models["gpt2"], tmp_path / "a")
    torch.testing.assert_close(outputs(loaded, ctx), outputs(model, ctx))


def test_cpu_int8_at_load_quantises_gpt2s_conv1d_blocks(tiny_models):
    """--precision cpu-int8 on a GPT-2: its blocks on torch's int8 kernels, not
    left fp32 under a summary that says cpu-int8."""
    spec = ModelSpec(tiny_models["gpt2"], "score")
    full = load_model(spec)
    int8 = load_model(replace(spec, precision="cpu-int8"))
    kinds = {type(m).__module__ for m in int8.transformer.h.modules()}
    assert "torch.ao.nn.quantized.dynamic.modules.linear" in kinds
    assert Conv1D not in {type(m) for m in int8.modules()}
    ids = load_tokenizer(spec.path)(sentences(4), return_tensors="pt", padding=True)
    with torch.inference_mode():
        a, b = full(**ids).logits, int8(**ids).logits
    assert 0 < (a - b).abs().max() < 0.05


def test_whole_model_bf16_is_a_plain_checkpoint(tiny_models, tmp_path):
    model, ctx = apply("bert", tiny_models, [{"quantize": {"method": "bf16"}}])
    loaded = reload(model, ctx, tiny_models["bert"], tmp_path / "a")
    assert loaded.dtype == torch.bfloat16
    assert ArtifactMeta.read(tmp_path / "a").rebuild == {}
    torch.testing.assert_close(outputs(loaded, ctx), outputs(model, ctx))


def test_bitsandbytes_settings_are_reapplied_at_load(tiny_models, tmp_path):
    import bitsandbytes as bnb

    model, ctx = apply(
        "bert", tiny_models, [{"quantize": {"method": "int8", "skip": ["*layer.1.*"]}}]
    )
    loaded = reload(model, ctx, tiny_models["bert"], tmp_path / "a")
    kinds = {n: type(m) for n, m in loaded.named_modules()}
    assert kinds["encoder.layer.0.intermediate.dense"] is bnb.nn.Linear8bitLt
    assert kinds["encoder.layer.1.intermediate.dense"] is torch.nn.Linear
    assert fidelity(loaded, ctx, ctx.eval_batches)["cosine"] > 0.98


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_bitsandbytes_artifacts_store_their_quantised_weights(
    method, tiny_models, tmp_path
):
    """The file holds bitsandbytes' own tensors and shrinks with them; it loads as
    stored and gives what quantising the original at load gives; its parameters are
    counted as the original's, not as packed bytes."""
    import bitsandbytes as bnb
    from safetensors import safe_open

    from lmbatch.actors.footprint import model_bytes

    base = tiny_models["bert64"]  # 4-bit CPU blocks are 64 wide
    model, ctx = apply_at(base, "embed", [{"quantize": {"method": method}}])
    out = tmp_path / "a"
    loaded = reload(model, ctx, base, out)
    layer = {"int8": bnb.nn.Linear8bitLt, "nf4": bnb.nn.Linear4bit}[method]
    assert type(loaded.get_submodule("encoder.layer.0.intermediate.dense")) is layer
    with safe_open(out / "model.safetensors", "pt") as f:
        name = "encoder.layer.0.intermediate.dense.weight"
        assert f.get_slice(name).get_dtype() == {"int8": "I8", "nf4": "U8"}[method]
    stored = (out / "model.safetensors").stat().st_size
    assert stored < 0.6 * (Path(base) / "model.safetensors").stat().st_size
    at_load = load_model(ModelSpec(base, "embed", precision=method))
    torch.testing.assert_close(outputs(loaded, ctx), outputs(at_load, ctx))
    assert (
        sizes(loaded, out, {})["parameters"]
        == sizes(ctx.teacher, out, {})["parameters"]
    )
    # The pool's footprint, read off the stored tensors as off the original's: each
    # layer's quantisation state weighs more on 64-wide layers (0.1% on MiniLM).
    assert model_bytes(str(out), method) == pytest.approx(
        model_bytes(base, method), rel=0.15
    )


def test_search_meets_its_floor(tiny_models):
    floor = 0.9995
    model, ctx = apply(
        "bert",
        tiny_models,
        [
            {
                "search": {
                    "floor": {"cosine": floor},
                    "choices": ["keep", "bf16", "cpu-int8"],
                    "rows": 32,
                }
            }
        ],
    )
    assert fidelity(model, ctx, ctx.eval_batches[:2])["cosine"] >= floor
    assert set(ctx.search["assignment"].values()) <= {"keep", "bf16", "cpu-int8"}
    assert ctx.search["rows_per_s"].keys() == {"keep", "bf16", "cpu-int8"}


def test_calibration_pairs_are_one_sequence_with_token_types(tiny_models):
    """A cross-encoder's calibration and evaluation rows are what infer's classify
    feeds it: the tokenizer's pair template, cut longest first, with token types."""
    tok = load_tokenizer(tiny_models["bert_cls"])
    rows = [("a short query", "a passage " * 40), ("the query", "it is")]
    batches = make_batches(tok, rows, 24, 2)
    (batch,) = batches
    for i, (text, pair) in enumerate(sorted(rows, key=lambda r: len("".join(r)))):
        want = tok(text, pair, truncation=True, max_length=24)
        n = len(want["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == want["input_ids"]
        assert batch["token_type_ids"][i, :n].tolist() == want["token_type_ids"]
    assert batch["token_type_ids"].sum() > 0
    assert "token_type_ids" not in make_batches(tok, ["one text"], 24, 2)[0]
