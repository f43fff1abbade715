"""Recipes: an ordered list of compression steps, validated before anything runs.

    steps:
      - prune: {method: structured, heads: 0.25, ffn: 0.3}
      - distill: {layers: 4, temperature: 2.0, alpha: 0.5, steps: 300}
      - quantize: {method: cpu-int8, skip: ["*pooler*"]}

Each step name maps to one config dataclass (``STEPS``, a registry: names never resolve
to an import path). An unknown step or key, a wrong type or a value out of range fails
with one line naming ``steps[i].step.field``. The resolved recipe, defaults filled in,
is written into every artifact's ``lmbatch.json`` and reads back through ``to_steps``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from actors.errors import UserError

QUANT_METHODS = ("int8", "nf4", "cpu-int8", "fp16", "bf16")
PRUNE_METHODS = ("magnitude", "activation", "structured")
DISTILL_LOSSES = ("auto", "kl", "cosine", "mse")
FLOOR_METRICS = ("cosine", "top10", "perplexity_increase", "agreement")
SEARCH_CHOICES = ("keep", "bf16", "cpu-int8", "lowrank")


class RecipeError(UserError):
    """A recipe mistake; ``where`` is ``steps[i].step.field``."""


@dataclass(frozen=True)
class Qat:
    """Quantization-aware fine-tuning: fake-quantized weights trained to the teacher."""

    steps: int = 100
    lr: float = 2e-5

    def check(self, where: str) -> None:
        _range(where, "steps", self.steps, 1, 100_000)
        _range(where, "lr", self.lr, 1e-8, 1.0)


@dataclass(frozen=True)
class Quantize:
    method: (
        str  # int8 | nf4 (bitsandbytes) | cpu-int8 (torch int8 kernels) | fp16 | bf16
    )
    skip: tuple[str, ...] = ()  # module-name globs kept in fp32: a mixed model
    activations: str = "dynamic"  # cpu-int8: dynamic, or static (calibrated scales)
    qat: Qat | None = None  # cpu-int8: fine-tune with fake quantization first
    int8_threshold: float = 6.0  # int8: LLM.int8 outlier threshold

    def check(self, where: str) -> None:
        _choice(where, "method", self.method, QUANT_METHODS)
        _choice(where, "activations", self.activations, ("dynamic", "static"))
        if self.method != "cpu-int8" and (self.activations != "dynamic" or self.qat):
            raise RecipeError(
                where, "activations: static and qat need method: cpu-int8"
            )
        if self.qat:
            self.qat.check(f"{where}.qat")
        _range(where, "int8_threshold", self.int8_threshold, 0.0, 1000.0)


@dataclass(frozen=True)
class Prune:
    method: str  # magnitude | activation (Wanda: |w| x input norm) | structured
    sparsity: float = 0.5  # magnitude/activation: fraction of weights zeroed
    pattern: str = "unstructured"  # or N:M, e.g. 2:4 (N of every M inputs kept)
    scope: str = "layer"  # layer: each Linear alike; global: one threshold for all
    heads: float = 0.0  # structured: fraction of attention heads removed per layer
    ffn: float = 0.0  # structured: fraction of feed-forward neurons removed per layer
    rounds: int = 1  # iterative pruning: reach the target in this many rounds
    finetune_steps: int = 0  # distillation steps against the original after each round
    storage: str = "dense"  # dense, or bitmask: zeros cost one bit in the artifact
    skip: tuple[str, ...] = ()  # module-name globs left alone

    def check(self, where: str) -> None:
        _choice(where, "method", self.method, PRUNE_METHODS)
        _choice(where, "scope", self.scope, ("layer", "global"))
        _choice(where, "storage", self.storage, ("dense", "bitmask"))
        _range(where, "rounds", self.rounds, 1, 100)
        _range(where, "finetune_steps", self.finetune_steps, 0, 100_000)
        if self.method == "structured":
            _range(where, "heads", self.heads, 0.0, 0.95)
            _range(where, "ffn", self.ffn, 0.0, 0.95)
            if not (self.heads or self.ffn):
                raise RecipeError(f"{where}.ffn", "structured needs heads or ffn > 0")
            if self.storage != "dense":
                raise RecipeError(
                    f"{where}.storage", "structured pruning is already dense"
                )
            return
        _range(where, "sparsity", self.sparsity, 0.01, 0.99)
        if self.pattern != "unstructured":
            n, m = nm_pattern(self.pattern, f"{where}.pattern")
            if self.scope == "global":
                raise RecipeError(f"{where}.scope", f"{n}:{m} is per layer by nature")
            if self.rounds > 1:
                raise RecipeError(f"{where}.rounds", f"{n}:{m} is reached in one round")


@dataclass(frozen=True)
class Distill:
    layers: int | None = None  # student: every k-th teacher layer, this many
    student: str | None = None  # or a model directory; neither: the model itself
    temperature: float = 2.0  # softens logits (kl loss)
    alpha: float = 0.5  # weight of the soft loss; 1 - alpha on labels where they exist
    steps: int = 300
    lr: float = 5e-5
    batch_size: int = 16
    max_length: int = 128  # tokens per training row
    loss: str = "auto"  # auto: kl for logits, cosine + mse for embeddings

    def check(self, where: str) -> None:
        if self.layers is not None and self.student is not None:
            raise RecipeError(f"{where}.student", "give layers or student, not both")
        if self.layers is not None:
            _range(where, "layers", self.layers, 1, 1000)
        if self.student is not None and not Path(self.student).is_dir():
            raise RecipeError(f"{where}.student", f"not a directory: {self.student}")
        _range(where, "temperature", self.temperature, 0.1, 100.0)
        _range(where, "alpha", self.alpha, 0.0, 1.0)
        _range(where, "steps", self.steps, 1, 1_000_000)
        _range(where, "lr", self.lr, 1e-8, 1.0)
        _range(where, "batch_size", self.batch_size, 1, 4096)
        _range(where, "max_length", self.max_length, 8, 32768)
        _choice(where, "loss", self.loss, DISTILL_LOSSES)


@dataclass(frozen=True)
class Lowrank:
    rank_ratio: float | None = None  # kept rank / full rank
    energy: float | None = None  # or: smallest rank keeping this share of sum(s^2)
    activation_aware: bool = False  # weigh inputs by their calibration norms (ASVD)
    min_saving: float = 0.1  # skip a layer unless its factors save this share
    skip: tuple[str, ...] = ()

    def check(self, where: str) -> None:
        if (self.rank_ratio is None) == (self.energy is None):
            raise RecipeError(f"{where}.rank_ratio", "give rank_ratio or energy")
        if self.rank_ratio is not None:
            _range(where, "rank_ratio", self.rank_ratio, 0.01, 1.0)
        if self.energy is not None:
            _range(where, "energy", self.energy, 0.5, 1.0)
        _range(where, "min_saving", self.min_saving, 0.0, 0.99)


@dataclass(frozen=True)
class Share:
    clusters: int = 256  # codebook entries per Linear; indices stored as uint8
    iterations: int = 15  # k-means iterations
    skip: tuple[str, ...] = ()

    def check(self, where: str) -> None:
        _range(where, "clusters", self.clusters, 16, 256)
        _range(where, "iterations", self.iterations, 1, 1000)


@dataclass(frozen=True)
class Search:
    floor: dict[str, float]  # e.g. {cosine: 0.99} or {perplexity_increase: 0.05}
    choices: tuple[str, ...] = ("keep", "bf16", "cpu-int8")  # per Linear, cheap first
    rank_ratio: float = 0.5  # for the lowrank choice
    rows: int = 256  # evaluation rows for each trial

    def check(self, where: str) -> None:
        if not self.floor:
            raise RecipeError(f"{where}.floor", "name at least one metric")
        for metric, value in self.floor.items():
            _choice(f"{where}.floor", "metric", metric, FLOOR_METRICS)
            if not isinstance(value, int | float):
                raise RecipeError(f"{where}.floor.{metric}", "expected a number")
        for choice in self.choices:
            _choice(where, "choices", choice, SEARCH_CHOICES)
        if "keep" not in self.choices:
            raise RecipeError(f"{where}.choices", "must include keep")
        _range(where, "rank_ratio", self.rank_ratio, 0.01, 1.0)
        _range(where, "rows", self.rows, 8, 100_000)


Step = Quantize | Prune | Distill | Lowrank | Share | Search
STEPS: dict[str, type] = {
    "quantize": Quantize,
    "prune": Prune,
    "distill": Distill,
    "lowrank": Lowrank,
    "share": Share,
    "search": Search,
}
STEP_NAMES = {cls: name for name, cls in STEPS.items()}


def load_recipe(path: str) -> list[Step]:
    """Read and validate a recipe file (YAML, safe-loaded: data, never code)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UserError("--recipe", f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError("--recipe", f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
        raise UserError("--recipe", f"{path} needs a top-level list `steps`")
    extra = set(data) - {"steps"}
    if extra:
        raise UserError("--recipe", f"unknown top-level key {sorted(extra)[0]!r}")
    return to_steps(data["steps"])


def to_steps(items: list) -> list[Step]:
    """One config per ``{name: {field: value}}``, checked. Raises RecipeError."""
    if not items:
        raise RecipeError("steps", "empty: name at least one step")
    steps = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or len(item) != 1:
            raise RecipeError(f"steps[{i}]", "each step is one `name: {fields}`")
        ((name, fields),) = item.items()
        where = f"steps[{i}].{name}"
        if name not in STEPS:
            raise RecipeError(where, f"unknown step; use {', '.join(STEPS)}")
        step = _build(STEPS[name], fields or {}, where)
        step.check(where)
        steps.append(step)
    for i, step in enumerate(steps[:-1]):
        if isinstance(step, Quantize | Search):
            name = STEP_NAMES[type(step)]
            raise RecipeError(
                f"steps[{i}].{name}",
                f"{name} must be the last step: later steps cannot train or reshape "
                "quantized layers; move it to the end",
            )
    return steps


def to_dicts(steps: list[Step]) -> list[dict]:
    """The resolved recipe as plain data, for lmbatch.json and the report."""
    return [{STEP_NAMES[type(s)]: _plain(dataclasses.asdict(s))} for s in steps]


def nm_pattern(pattern: str, where: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): keep N of every M consecutive input weights."""
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise RecipeError(
            where, f"expected unstructured or N:M, got {pattern!r}"
        ) from None
    if not 0 < n < m <= 64:
        raise RecipeError(where, f"N:M needs 0 < N < M <= 64, got {pattern!r}")
    return n, m


def _build(cls: type, fields: Any, where: str):
    if not isinstance(fields, dict):
        raise RecipeError(where, "expected a mapping of fields")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in fields:
        if key not in known:
            raise RecipeError(
                f"{where}.{key}", f"unknown field; use {', '.join(sorted(known))}"
            )
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.name not in fields
    ]
    if missing:
        raise RecipeError(f"{where}.{missing[0]}", "required")
    values = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in fields.items()}
    return cls(**values)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a field's type; tuples from lists, nested configs."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType):  # X | None
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value or {}, where)
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise RecipeError(where, f"expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], where) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(where, f"expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise RecipeError(where, f"expected {hint.__name__}, got {value!r}")
    return value


def _range(where: str, name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise RecipeError(f"{where}.{name}", f"{value} is outside [{low}, {high}]")


def _choice(where: str, name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise RecipeError(
            f"{where}.{name}", f"unknown {value!r}; use {', '.join(allowed)}"
        )


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
