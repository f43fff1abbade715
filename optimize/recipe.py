"""Recipes: an ordered list of compression steps, validated before anything runs.

    steps:
      - prune: {method: structured, heads: 0.25, ffn: 0.3}
      - distill: {layers: 4, temperature: 2.0, alpha: 0.5, steps: 300}
      - quantize: {method: cpu-int8, skip: ["*pooler*"]}

Each step name is a field of ``StepEntry`` holding one pydantic model (a registry:
names never resolve to an import path). pydantic checks every field: an unknown step
or key, a wrong type or a value out of range fails with one line naming
``steps[i].step.field``. The resolved recipe, defaults filled in, is written into every
artifact's ``lmbatch.json`` and reads back through ``to_steps``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from lmbatch.actors.storage import read_yaml
from lmbatch.errors import FieldError, UserError, UserModel, dotted, from_validation

# Module-name globs: a list in YAML, kept as a tuple.
Globs = Annotated[tuple[str, ...], Field(strict=False)]
FloorMetric = Literal["cosine", "top10", "perplexity_increase", "agreement", "spearman"]
SearchChoice = Literal["keep", "bf16", "cpu-int8", "lowrank"]


def given(step: UserModel) -> set[str]:
    """The fields set to other than their defaults: those a method that ignores them
    refuses. (Not ``model_fields_set``: an artifact's recipe, written with every
    default, reads back through these models.)"""
    fields = type(step).model_fields
    return {name for name, f in fields.items() if getattr(step, name) != f.default}


class Qat(UserModel):
    """Quantization-aware fine-tuning: fake-quantized weights trained to the teacher."""

    steps: int = Field(100, ge=1, le=100_000)
    lr: float = Field(2e-5, ge=1e-8, le=1.0)


class Quantize(UserModel):
    # int8 | nf4 (bitsandbytes) | cpu-int8 (torch int8 kernels) | fp16 | bf16
    method: Literal["int8", "nf4", "cpu-int8", "fp16", "bf16"]
    skip: Globs = ()  # module-name globs kept in fp32: a mixed model
    # cpu-int8: dynamic, or static (calibrated scales)
    activations: Literal["dynamic", "static"] = "dynamic"
    qat: Qat | None = None  # cpu-int8: fine-tune with fake quantization first
    int8_threshold: float = Field(6.0, ge=0.0, le=1000.0)  # int8: LLM.int8 outliers

    @model_validator(mode="after")
    def _method_options(self) -> Quantize:
        if self.method != "cpu-int8" and (self.activations != "dynamic" or self.qat):
            raise ValueError("activations: static and qat need method: cpu-int8")
        if self.method != "int8" and "int8_threshold" in given(self):
            raise FieldError(
                "int8_threshold",
                f"applies to method: int8 (LLM.int8's outliers), not {self.method}",
            )
        return self


class Prune(UserModel):
    method: Literal["magnitude", "activation", "structured"]  # activation: Wanda
    sparsity: float = Field(0.5, ge=0.01, le=0.99)  # fraction of weights zeroed
    pattern: str = "unstructured"  # or N:M, e.g. 2:4 (N of every M inputs kept)
    scope: Literal["layer", "global"] = "layer"  # global: one threshold for all
    heads: float = Field(0.0, ge=0.0, le=0.95)  # structured: attention heads removed
    ffn: float = Field(0.0, ge=0.0, le=0.95)  # structured: feed-forward neurons removed
    rounds: int = Field(1, ge=1, le=100)  # iterative: reach the target in this many
    finetune_steps: int = Field(0, ge=0, le=100_000)  # distillation after each round
    storage: Literal["dense", "bitmask"] = "dense"  # bitmask: zeros cost one bit
    skip: Globs = ()  # module-name globs left alone

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, pattern: str) -> str:
        if pattern != "unstructured":
            nm_pattern(pattern)
        return pattern

    @model_validator(mode="after")
    def _consistent(self) -> Prune:
        if self.method == "structured":
            self._structured_only()
            if not (self.heads or self.ffn):
                raise FieldError("ffn", "structured needs heads or ffn > 0")
            if self.storage != "dense":
                raise FieldError("storage", "structured pruning is already dense")
            return self
        for name in ("heads", "ffn"):
            if name in given(self):
                raise FieldError(
                    name,
                    f"applies to method: structured; {self.method} zeroes a "
                    "sparsity: of the weights",
                )
        if self.pattern != "unstructured":
            if self.scope == "global":
                raise FieldError("scope", f"{self.pattern} is per layer by nature")
            if self.rounds > 1:
                raise FieldError("rounds", f"{self.pattern} is reached in one round")
        return self

    def _structured_only(self) -> None:
        """Refuse what structured pruning would ignore: it removes whole heads and
        neurons, as many from every block, in one round."""
        ignored = {
            "sparsity": "it removes whole heads and neurons: give heads: or ffn: "
            "(the fractions removed) instead",
            "pattern": "applies to magnitude and activation pruning",
            "scope": "applies to magnitude and activation pruning",
            "rounds": "structured prunes in one round; a distill step after it "
            "recovers what it lost",
            "finetune_steps": "structured prunes in one round; a distill step "
            "after it recovers what it lost",
            "skip": "structured removes as many heads and neurons from every block; "
            "skip applies to magnitude and activation pruning",
        }
        for name, why in ignored.items():
            if name in given(self):
                raise FieldError(name, f"not with method: structured: {why}")


class Distill(UserModel):
    layers: int | None = Field(None, ge=1, le=1000)  # student: every k-th layer
    student: str | None = None  # or a model directory; neither: the model itself
    temperature: float = Field(2.0, ge=0.1, le=100.0)  # softens logits (kl loss)
    alpha: float = Field(0.5, ge=0.0, le=1.0)  # weight of the soft loss
    steps: int = Field(300, ge=1, le=1_000_000)
    lr: float = Field(5e-5, ge=1e-8, le=1.0)
    batch_size: int = Field(16, ge=1, le=4096)
    max_length: int = Field(128, ge=8, le=32768)  # tokens per training row
    # auto: kl for logits, cosine + mse for embeddings
    loss: Literal["auto", "kl", "cosine", "mse"] = "auto"

    @field_validator("student")
    @classmethod
    def _student_is_a_directory(cls, student: str | None) -> str | None:
        if student is not None and not Path(student).is_dir():
            raise ValueError(f"not a directory: {student}")
        return student

    @model_validator(mode="after")
    def _one_student(self) -> Distill:
        if self.layers is not None and self.student is not None:
            raise FieldError("student", "give layers or student, not both")
        return self

    def ignored_by(self, task: str, scores: str) -> tuple[str, str] | None:
        """A field this task's loss would ignore, and why (optimize/distill.py):
        embeddings are distilled by cosine (and mse of the blocks' outputs), logits
        by kl at ``temperature`` or by mse (a regression's values: ``scores``
        none), and only a causal LM's text is its own label (``alpha``)."""
        changed = given(self)
        raw = (
            "loss: mse compares the logits as they are"
            if self.loss == "mse"
            else "a regression's values are compared as they are"
        )
        rules = [
            (task == "embed" and self.loss == "kl", "loss",
             "kl compares logits; an embedding model's loss is cosine"),
            (task == "embed" and "temperature" in changed, "temperature",
             "applies to logits (--task score or classify)"),
            (task != "embed" and self.loss == "cosine", "loss",
             f"cosine compares embeddings; --task {task} has logits"),
            (scores == "none" and self.loss == "kl", "loss",
             "kl compares distributions; a regression's values take mse"),
            (task != "embed" and (self.loss == "mse" or scores == "none")
             and "temperature" in changed, "temperature",
             f"softens kl's distributions; {raw}"),
            (task != "score" and "alpha" in changed, "alpha",
             f"weighs the next-token loss of --task score; --task {task} learns "
             "from the teacher's outputs alone"),
        ]  # fmt: skip
        return next(((name, why) for hit, name, why in rules if hit), None)


class Lowrank(UserModel):
    rank_ratio: float | None = Field(None, ge=0.01, le=1.0)  # kept rank / full rank
    energy: float | None = Field(None, ge=0.5, le=1.0)  # or: share of sum(s^2) kept
    activation_aware: bool = False  # weigh inputs by their calibration norms (ASVD)
    min_saving: float = Field(0.1, ge=0.0, le=0.99)  # else the layer stays dense
    skip: Globs = ()

    @model_validator(mode="after")
    def _one_rank_rule(self) -> Lowrank:
        if (self.rank_ratio is None) == (self.energy is None):
            raise FieldError("rank_ratio", "give rank_ratio or energy")
        return self


class Share(UserModel):
    clusters: int = Field(256, ge=16, le=256)  # codebook entries; uint8 indices
    iterations: int = Field(15, ge=1, le=1000)  # k-means iterations
    skip: Globs = ()


class Search(UserModel):
    # e.g. {cosine: 0.99} or {perplexity_increase: 0.05}
    floor: Annotated[dict[FloorMetric, float], Field(min_length=1)]
    # per Linear, cheap first
    choices: Annotated[tuple[SearchChoice, ...], Field(strict=False)] = (
        "keep",
        "bf16",
        "cpu-int8",
    )
    rank_ratio: float = Field(0.5, ge=0.01, le=1.0)  # for the lowrank choice
    rows: int = Field(256, ge=8, le=100_000)  # evaluation rows for each trial

    @model_validator(mode="after")
    def _keep_is_a_choice(self) -> Search:
        if "keep" not in self.choices:
            raise FieldError("choices", "must include keep")
        if "lowrank" not in self.choices and "rank_ratio" in given(self):
            raise FieldError("rank_ratio", "applies to the lowrank choice: add it")
        return self


Step = Quantize | Prune | Distill | Lowrank | Share | Search


class StepEntry(UserModel):
    """One ``name: {fields}`` item of ``steps``."""

    quantize: Quantize | None = None
    prune: Prune | None = None
    distill: Distill | None = None
    lowrank: Lowrank | None = None
    share: Share | None = None
    search: Search | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_named_step(cls, data: object) -> object:
        if not isinstance(data, dict) or len(data) != 1:
            raise ValueError("each step is one `name: {fields}`")
        ((name, fields),) = data.items()
        if name not in cls.model_fields:
            raise FieldError(name, f"unknown step; use {', '.join(cls.model_fields)}")
        return {name: {} if fields is None else fields}

    @property
    def step(self) -> Step:
        return next(v for n in self.model_fields if (v := getattr(self, n)) is not None)


STEP_NAMES: dict[type, str] = {
    field.annotation.__args__[0]: name  # the X of `X | None`
    for name, field in StepEntry.model_fields.items()
}
# Steps after which nothing may come: later steps cannot train or reshape quantized
# layers, and a search's choice is final.
LAST_ONLY = (Quantize, Search)
BITSANDBYTES = ("int8", "nf4")


def own_layers(step: Step) -> str | None:
    """What of lmbatch's own a step leaves in the model (rebuilt at load from
    lmbatch.json), which bitsandbytes cannot quantize: None where it leaves layers
    the config describes (an FFN cut the same in every block, a distilled student)."""
    if isinstance(step, Lowrank):
        return "low-rank factors"
    if isinstance(step, Share):
        return "codebook layers"
    if isinstance(step, Prune) and step.storage == "bitmask":
        return "bitmask-stored weights"
    if isinstance(step, Prune) and step.heads:
        return "attention layers cut to fewer heads"
    return None


class Recipe(UserModel):
    steps: list[StepEntry]

    @model_validator(mode="after")
    def _order(self) -> Recipe:
        if not self.steps:
            raise FieldError("steps", "empty: name at least one step")
        for i, entry in enumerate(self.steps[:-1]):
            if isinstance(entry.step, LAST_ONLY):
                name = STEP_NAMES[type(entry.step)]
                raise FieldError(
                    ("steps", i, name),
                    f"{name} must be the last step: later steps cannot train or "
                    "reshape quantized layers; move it to the end",
                )
        self._quantizable()
        return self

    def _quantizable(self) -> None:
        """bitsandbytes after a step that leaves lmbatch's own layers makes an
        artifact no job can load: refused before any step runs."""
        last = self.steps[-1].step
        if not (isinstance(last, Quantize) and last.method in BITSANDBYTES):
            return
        for i, entry in enumerate(self.steps[:-1]):
            if left := own_layers(entry.step):
                name = STEP_NAMES[type(entry.step)]
                raise FieldError(
                    ("steps", len(self.steps) - 1, "quantize", "method"),
                    f"{last.method} (bitsandbytes) cannot quantize the {left} that "
                    f"steps[{i}].{name} leaves; use cpu-int8, fp16 or bf16",
                )


def load_recipe(path: str) -> list[Step]:
    """Read and validate a recipe file, local or a URI (YAML, safe-loaded: data,
    never code)."""
    data = read_yaml(path, "--recipe")
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
        raise UserError("--recipe", f"{path} needs a top-level list `steps`")
    extra = set(data) - {"steps"}
    if extra:
        raise UserError("--recipe", f"unknown top-level key {sorted(extra)[0]!r}")
    return to_steps(data["steps"])


def to_steps(items: list) -> list[Step]:
    """One config per ``{name: {field: value}}``, checked.

    Raises:
        UserError: at ``steps[i].name.field``.
    """
    try:
        return [entry.step for entry in Recipe(steps=items).steps]
    except ValidationError as e:
        raise from_validation(e, dotted) from None


def to_dicts(steps: list[Step]) -> list[dict]:
    """The resolved recipe as plain data, for lmbatch.json and the report."""
    return [{STEP_NAMES[type(s)]: s.model_dump(mode="json")} for s in steps]


def nm_pattern(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): keep N of every M consecutive input weights.

    Raises:
        ValueError: for anything else (pydantic names the field).
    """
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise ValueError(f"expected unstructured or N:M, got {pattern!r}") from None
    if not 0 < n < m <= 64:
        raise ValueError(f"N:M needs 0 < N < M <= 64, got {pattern!r}")
    return n, m
