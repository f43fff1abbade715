"""Recipes: every bad one refused with its step and field named; good ones
round-trip."""

from __future__ import annotations

import pytest
import yaml

from lmbatch.errors import UserError
from lmbatch.optimize.recipe import (
    Distill,
    Prune,
    Quantize,
    load_recipe,
    to_dicts,
    to_steps,
)

BAD = [
    ([{"squash": {}}], "steps[0].squash: unknown step"),
    (
        [{"prune": {"method": "magnitude", "sparsty": 0.5}}],
        "steps[0].prune.sparsty: unknown field",
    ),
    (
        [{"prune": {"method": "magnitude", "sparsity": 1.5}}],
        "steps[0].prune.sparsity: input should be less than or equal to 0.99, got 1.5",
    ),
    ([{"prune": {"method": "wavelet"}}], "steps[0].prune.method: unknown 'wavelet'"),
    ([{"prune": {"method": "structured"}}], "steps[0].prune.ffn: structured needs"),
    # A field the method would ignore is refused, not dropped.
    (
        [{"search": {"floor": {"cosine": 0.9}, "rank_ratio": 0.3}}],
        "steps[0].search.rank_ratio: applies to the lowrank choice: add it",
    ),
    (
        [{"prune": {"method": "structured", "sparsity": 0.3}}],
        "steps[0].prune.sparsity: not with method: structured: it removes whole "
        "heads and neurons: give heads: or ffn: (the fractions removed) instead",
    ),
    (
        [{"prune": {"method": "structured", "heads": 0.2, "skip": ["*layer.0.*"]}}],
        "steps[0].prune.skip: not with method: structured: structured removes as "
        "many heads and neurons from every block",
    ),
    (
        [{"prune": {"method": "structured", "ffn": 0.2, "finetune_steps": 50}}],
        "steps[0].prune.finetune_steps: not with method: structured: structured "
        "prunes in one round; a distill step after it recovers what it lost",
    ),
    (
        [{"prune": {"method": "activation", "heads": 0.2}}],
        "steps[0].prune.heads: applies to method: structured; activation zeroes a "
        "sparsity: of the weights",
    ),
    (
        [{"quantize": {"method": "nf4", "int8_threshold": 4.0}}],
        "steps[0].quantize.int8_threshold: applies to method: int8 (LLM.int8's "
        "outliers), not nf4",
    ),
    ([{"prune": {"method": "magnitude", "pattern": "4:2"}}], "steps[0].prune.pattern"),
    (
        [{"prune": {"method": "magnitude", "pattern": "2:4", "scope": "global"}}],
        "steps[0].prune.scope",
    ),
    (
        [{"prune": {"method": "magnitude", "pattern": "2:4", "rounds": 2}}],
        "steps[0].prune.rounds",
    ),
    (
        [{"prune": {"method": "magnitude", "sparsity": "half"}}],
        "steps[0].prune.sparsity: expected float",
    ),
    ([{"distill": {"steps": True}}], "steps[0].distill.steps: expected int"),
    ([{"distill": {"layers": 2, "student": "/x"}}], "steps[0].distill.student"),
    ([{"distill": {"alpha": 2}}], "steps[0].distill.alpha"),
    ([{"quantize": {}}], "steps[0].quantize.method: required"),
    ([{"quantize": {"method": "int4"}}], "steps[0].quantize.method: unknown 'int4'"),
    (
        [{"quantize": {"method": "bf16", "activations": "static"}}],
        "steps[0].quantize: activations: static and qat need method: cpu-int8",
    ),
    (
        [{"quantize": {"method": "cpu-int8", "qat": {"steps": 0}}}],
        "steps[0].quantize.qat.steps",
    ),
    (
        [{"quantize": {"method": "cpu-int8", "skip": "pooler"}}],
        "steps[0].quantize.skip: expected a list",
    ),
    (
        [{"quantize": {"method": "cpu-int8"}}, {"distill": {}}],
        "steps[0].quantize: quantize must be the last step",
    ),
    ([{"lowrank": {}}], "steps[0].lowrank.rank_ratio: give rank_ratio or energy"),
    ([{"lowrank": {"rank_ratio": 0.5, "energy": 0.9}}], "give rank_ratio or energy"),
    ([{"share": {"clusters": 1024}}], "steps[0].share.clusters"),
    ([{"search": {"floor": {}}}], "steps[0].search.floor"),
    ([{"search": {"floor": {"bleu": 0.9}}}], "steps[0].search.floor.bleu: unknown"),
    (
        [{"search": {"floor": {"cosine": 0.99}, "choices": ["bf16"]}}],
        "steps[0].search.choices: must include keep",
    ),
    # bitsandbytes cannot quantize lmbatch's own layers: no job could load the artifact.
    (
        [{"lowrank": {"rank_ratio": 0.5}}, {"quantize": {"method": "int8"}}],
        "steps[1].quantize.method: int8 (bitsandbytes) cannot quantize the low-rank "
        "factors that steps[0].lowrank leaves",
    ),
    (
        [{"share": {}}, {"quantize": {"method": "nf4"}}],
        "steps[1].quantize.method: nf4 (bitsandbytes) cannot quantize the codebook",
    ),
    (
        [
            {"prune": {"method": "magnitude", "storage": "bitmask"}},
            {"distill": {}},
            {"quantize": {"method": "int8"}},
        ],
        "steps[2].quantize.method: int8 (bitsandbytes) cannot quantize the "
        "bitmask-stored weights that steps[0].prune leaves",
    ),
    (
        [
            {"prune": {"method": "structured", "heads": 0.25}},
            {"quantize": {"method": "nf4"}},
        ],
        "cannot quantize the attention layers cut to fewer heads that steps[0].prune",
    ),
    ([], "steps: empty"),
    ([{"prune": {}, "distill": {}}], "steps[0]: each step is one"),
    (["prune"], "steps[0]: each step is one"),
]


@pytest.mark.parametrize(
    ("task", "scores", "fields", "ignored"),
    [
        ("embed", "softmax", {"loss": "kl"}, "loss"),
        ("embed", "softmax", {"temperature": 4.0}, "temperature"),
        ("embed", "softmax", {"alpha": 0.9}, "alpha"),
        ("classify", "softmax", {"loss": "cosine"}, "loss"),
        ("classify", "softmax", {"alpha": 0.9}, "alpha"),
        ("classify", "none", {"loss": "kl"}, "loss"),  # a regression
        ("classify", "none", {"temperature": 3.0}, "temperature"),
        ("score", "softmax", {"loss": "mse", "temperature": 3.0}, "temperature"),
        ("embed", "softmax", {"loss": "mse"}, None),  # + the blocks' outputs
        ("embed", "softmax", {"loss": "cosine"}, None),
        ("classify", "sigmoid", {"loss": "kl", "temperature": 3.0}, None),
        ("classify", "none", {"loss": "mse"}, None),
        ("score", "softmax", {"alpha": 0.9, "temperature": 3.0}, None),
        ("score", "softmax", {"loss": "mse", "alpha": 0.2}, None),
    ],
)
def test_a_distill_field_the_tasks_loss_ignores_is_named(task, scores, fields, ignored):
    found = Distill(**fields).ignored_by(task, scores)
    assert (found and found[0]) == ignored, found


@pytest.mark.parametrize("items,message", BAD)
def test_bad_recipe_names_the_field(items, message):
    with pytest.raises(UserError) as e:
        to_steps(items)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "first",
    [
        {"prune": {"method": "structured", "ffn": 0.3}},  # the config still says it
        {"prune": {"method": "magnitude", "sparsity": 0.3}},
        {"distill": {"layers": 2}},
    ],
)
def test_bitsandbytes_after_a_step_whose_layers_the_config_describes(first):
    assert to_steps([first, {"quantize": {"method": "int8"}}])[-1].method == "int8"


def test_recipe_file_errors(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("steps: [prune: {method: }\n")
    no_steps = tmp_path / "none.yaml"
    no_steps.write_text("prune: {}\n")
    extra = tmp_path / "extra.yaml"
    extra.write_text("steps: [{distill: {}}]\nname: x\n")
    code = tmp_path / "code.yaml"  # YAML tags that would build objects are refused
    code.write_text("steps: !!python/object/apply:os.system ['true']\n")
    binary = tmp_path / "model.safetensors"  # the wrong file given
    binary.write_bytes(b"\x89\xff\x00 weights")
    for path, message in [
        (tmp_path / "missing.yaml", "--recipe: no such file"),
        (bad_yaml, "is not valid YAML at line 2: expected ',' or ']'"),
        (no_steps, "needs a top-level list `steps`"),
        (extra, "unknown top-level key 'name'"),
        (code, "is not valid YAML at line 1: could not determine a constructor"),
        (binary, "is not UTF-8 text"),
    ]:
        with pytest.raises(UserError, match="--recipe") as e:
            load_recipe(str(path))
        assert message in str(e.value) and "\n" not in str(e.value)


def test_defaults_fill_in_and_round_trip(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "steps:\n"
        "  - prune: {method: structured, heads: 0.25, ffn: 0.3}\n"
        "  - distill: {layers: 4, temperature: 2, alpha: 0.5, steps: 300}\n"
        "  - quantize: {method: cpu-int8, skip: ['*pooler*']}\n"
    )
    steps = load_recipe(str(path))
    assert steps == [
        Prune(method="structured", heads=0.25, ffn=0.3),
        Distill(layers=4, temperature=2.0, alpha=0.5, steps=300),
        Quantize(method="cpu-int8", skip=("*pooler*",)),
    ]
    assert to_steps(yaml.safe_load(yaml.safe_dump(to_dicts(steps)))) == steps


def test_example_recipes_are_valid():
    from pathlib import Path

    recipes = sorted(
        (Path(__file__).parents[1] / "examples" / "recipes").glob("*.yaml")
    )
    assert len(recipes) >= 2
    for recipe in recipes:
        load_recipe(str(recipe))
