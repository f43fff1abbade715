"""A sentence-transformers model directory, read as sentence-transformers reads it.

``modules.json`` lists the modules that turn token states into a sentence embedding.
lmbatch runs every module sentence-transformers itself uses for text embedding
models: the Transformer (its ``max_seq_length`` and ``do_lower_case``), Pooling in
any of its modes (several concatenate, in the order given), Dense layers (with their
activation, and a residual where the widths match) and Normalize, in the order the
file lists them. Anything else is refused before Ray starts, one line naming the
module and its folder: an embedding quietly computed another way is worse than none.
JSON only here, no torch: the driver reads this; ``tasks.Embed`` runs it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from lmbatch.actors.model_files import weight_names
from lmbatch.errors import UserError

MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# Older sentence-transformers configs: one flag per mode, concatenated in this order.
LEGACY_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# Dense activations by the class name sentence-transformers saves: a whitelist, never
# an import of whatever a config names.
ACTIVATIONS = {
    f"torch.nn.modules.{module}.{name}": name
    for module, name in [
        ("linear", "Identity"),
        ("activation", "Tanh"),
        ("activation", "ReLU"),
        ("activation", "GELU"),
        ("activation", "Sigmoid"),
        ("activation", "SiLU"),
    ]
}
# sentence-transformers' encode(precision=...) that need no calibration ranges.
EMBEDDING_PRECISIONS = ("float32", "binary", "ubinary")
EMBEDDING = "sentence_embedding"  # the feature Dense and Normalize must read and write
NO_LIMIT = 10**6  # tokenizers say "no limit" with a huge model_max_length


@dataclass(frozen=True)
class Encoding:
    """What sentence-transformers' ``encode`` does to a model's vectors, in its
    order: the first ``truncate_dim`` dimensions (not normalised again), then
    L2-normalised (``normalize_embeddings``), then each dimension's sign packed
    into one bit (``precision``: ubinary as uint8 bytes, binary as those less 128,
    int8), 32x smaller, for a first pass of retrieval by Hamming distance."""

    truncate_dim: int | None = None
    normalize: bool = False
    precision: str = "float32"  # one of EMBEDDING_PRECISIONS

    def width(self, dimensions: int) -> int:
        """Values a row's vector holds, from the model's ``dimensions``."""
        if self.truncate_dim is not None:
            dimensions = min(dimensions, self.truncate_dim)
        return dimensions if self.precision == "float32" else -(-dimensions // 8)


@dataclass(frozen=True)
class Dense:
    folder: str  # in the model directory, with linear.weight/bias in ``weights``
    in_features: int
    out_features: int
    bias: bool
    activation: str  # a torch.nn class name, a value of ACTIVATIONS
    residual: bool = False  # out = activation(linear(x)) + x
    weights: str = "model.safetensors"  # or pytorch_model.bin, with --allow-pickle


Step = Dense | Literal["normalize"]


@dataclass(frozen=True)
class Sentence:
    """How token states become one embedding. A directory without ``modules.json``
    gets mean pooling, L2-normalised."""

    modes: tuple[str, ...] = ("mean",)
    steps: tuple[Step, ...] = ("normalize",)  # after pooling, in order
    max_seq_length: int | None = None  # tokens; None: the model's own limit
    lowercase: bool = False  # do_lower_case: texts lowercased before tokenizing
    # config_sentence_transformers.json's prompts, by name, and the one applied when
    # none is asked for; Pooling's include_prompt (False: its tokens are not pooled)
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    include_prompt: bool = True

    def width(self, hidden_size: int) -> int:
        """The embedding's width for a model of ``hidden_size``."""
        dense = [s for s in self.steps if isinstance(s, Dense)]
        return dense[-1].out_features if dense else hidden_size * len(self.modes)


def read_sentence(path: Path, allow_pickle: bool = False) -> Sentence:
    """The modules of the model at ``path``; ``allow_pickle``: a Dense module's
    weights may be a pickle (``pytorch_model.bin``, as older models keep them).

    Raises:
        UserError: naming ``--model`` and the module it cannot run.
    """
    listing = path / "modules.json"
    if not listing.is_file():
        return Sentence()
    modules = _json(listing, path)
    if not isinstance(modules, list) or not modules:
        raise UserError("--model", f"{listing} lists no modules")
    found: dict = {"steps": []}
    for i, module in enumerate(modules):
        where = f"{listing}: module {i} ({module.get('type')}, folder "
        where += f"{module.get('path') or '.'})"
        _read_module(path, module, where, found, allow_pickle)
    if "modes" not in found:
        raise UserError(
            "--model", f"{listing}: no Pooling module; no embedding to take"
        )
    config = _json(path / "config_sentence_transformers.json", path, {})
    prompts = {str(k): str(v or "") for k, v in (config.get("prompts") or {}).items()}
    default = config.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise UserError(
            "--model", f"{path}: default_prompt_name {default!r} is not one of its "
            f"prompts {sorted(prompts)}",
        )  # fmt: skip
    return Sentence(
        modes=found["modes"],
        steps=tuple(found["steps"]),
        max_seq_length=found.get("max_seq_length"),
        lowercase=found.get("lowercase", False),
        prompts=prompts,
        default_prompt_name=default,
        include_prompt=found.get("include_prompt", True),
    )


def resolve_prompt(
    sentence: Sentence, prompt: str | None, prompt_name: str | None
) -> str:
    """The text put before every text, as ``SentenceTransformer.encode`` picks it:
    ``--prompt`` as given, else the model's prompt ``--prompt-name``, else its
    ``default_prompt_name``'s; "" for none.

    Raises:
        UserError: naming ``--prompt-name`` where the model has no such prompt, or
            ``--prompt`` where both are given.
    """
    if prompt is not None and prompt_name is not None:
        raise UserError("--prompt", "give --prompt or --prompt-name, not both")
    if prompt is not None:
        return prompt
    if prompt_name is None:
        name = sentence.default_prompt_name
        return sentence.prompts.get(name, "") if name is not None else ""
    if prompt_name not in sentence.prompts:
        has = sorted(sentence.prompts) or "none"
        raise UserError(
            "--prompt-name", f"the model has no prompt {prompt_name!r} (it has {has})"
        )
    return sentence.prompts[prompt_name]


def _read_module(
    path: Path, module: dict, where: str, found: dict, allow_pickle: bool
) -> None:
    kind = str(module.get("type", "")).rpartition(".")[2]
    folder = path / module.get("path", "")
    known = str(module.get("type", "")).startswith("sentence_transformers.")
    first = "transformer" not in found
    if not known or kind not in ("Transformer", "Pooling", "Dense", "Normalize"):
        raise UserError(
            "--model", f"{where} is not supported: lmbatch runs Transformer, Pooling, "
            "Dense and Normalize modules",
        )  # fmt: skip
    if first != (kind == "Transformer"):
        raise UserError("--model", f"{where}: the Transformer must come first, once")
    if kind != "Transformer" and "modes" not in found and kind != "Pooling":
        raise UserError("--model", f"{where}: comes before any Pooling module")
    if kind == "Transformer":
        found["transformer"] = True
        found.update(_transformer(path, module, where))
    elif kind == "Pooling":
        pooling = _json(folder / "config.json", where)
        found["modes"] = _modes(pooling, where)
        found["include_prompt"] = bool(pooling.get("include_prompt", True))
    elif kind == "Dense":
        found["steps"].append(_dense(path, module, where, allow_pickle))
    else:
        _check_io(_json(folder / "config.json", where, {}), where)
        found["steps"].append("normalize")


def _transformer(path: Path, module: dict, where: str) -> dict:
    if module.get("path"):
        raise UserError(
            "--model", f"{where}: a Transformer in a folder of its own is not supported"
        )
    config = _json(path / "sentence_bert_config.json", where, {})
    task = config.get("transformer_task", "feature-extraction")
    output = config.get("module_output_name", "token_embeddings")
    if task != "feature-extraction" or output != "token_embeddings":
        raise UserError(
            "--model", f"{where}: transformer_task {task} ({output}) is not supported"
        )
    length = config.get("max_seq_length")
    if length is None:  # sentence-transformers 6 keeps it in the tokenizer's config
        tokenizer = _json(path / "tokenizer_config.json", where, {})
        length = tokenizer.get("model_max_length")
    limit = int(length) if isinstance(length, int | float) else None
    return {
        "max_seq_length": limit if limit and limit < NO_LIMIT else None,
        "lowercase": bool(config.get("do_lower_case", False)),
    }


def _modes(config: dict, where: str) -> tuple[str, ...]:
    given = config.get("pooling_mode")
    if given is None:
        modes = tuple(mode for key, mode in LEGACY_MODES.items() if config.get(key))
    else:
        modes = (given,) if isinstance(given, str) else tuple(given)
    if not modes or any(m not in MODES for m in modes):
        raise UserError(
            "--model",
            f"{where}: pooling {list(modes)}; lmbatch pools {', '.join(MODES)}",
        )
    return modes


def _dense(path: Path, module: dict, where: str, allow_pickle: bool) -> Dense:
    config = _json(path / module.get("path", "") / "config.json", where)
    _check_io(config, where)
    activation = ACTIVATIONS.get(config.get("activation_function", ""))
    if activation is None:
        raise UserError(
            "--model", f"{where}: activation {config.get('activation_function')} is "
            f"not one lmbatch runs ({', '.join(ACTIVATIONS.values())})",
        )  # fmt: skip
    dense = Dense(
        folder=module.get("path", ""),
        in_features=int(config["in_features"]),
        out_features=int(config["out_features"]),
        bias=bool(config.get("bias", True)),
        activation=activation,
        residual=bool(config.get("use_residual", False)),
    )
    if dense.residual and dense.in_features != dense.out_features:
        raise UserError(
            "--model", f"{where}: a residual across widths is not supported"
        )
    names = weight_names(str(path))
    if f"{dense.folder}/model.safetensors" in names:
        return dense
    if f"{dense.folder}/pytorch_model.bin" not in names:
        raise UserError("--model", f"{where}: no model.safetensors with its weights")
    if not allow_pickle:
        raise UserError(
            "--model", f"{where}: its weights are a pickle (pytorch_model.bin); "
            "pass --allow-pickle to trust them",
        )  # fmt: skip
    return replace(dense, weights="pytorch_model.bin")


def _check_io(config: dict, where: str) -> None:
    names = (
        config.get("module_input_name", EMBEDDING),
        config.get("module_output_name"),
    )
    if names[0] != EMBEDDING or names[1] not in (None, EMBEDDING):
        raise UserError("--model", f"{where}: reads or writes {names}, not {EMBEDDING}")


def _json(file: Path, where: object, default: dict | None = None):
    if not file.is_file():
        if default is not None:
            return default
        raise UserError("--model", f"{where}: {file.name} is missing")
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UserError("--model", f"cannot read {file}: {e}") from None


def module_folders(path: Path) -> list[str]:
    """The folders of a model directory's sentence-transformers modules (what an
    artifact must carry along), [] where there are none. A module without files
    (Normalize) may name a folder that is not there: a wheel cannot hold an empty
    one, and all-MiniLM-L6-v2's lacks its 2_Normalize."""
    listing = path / "modules.json"
    if not listing.is_file():
        return []
    folders = (m["path"] for m in _json(listing, path) if m.get("path"))
    return [f for f in folders if (path / f).is_dir()]
