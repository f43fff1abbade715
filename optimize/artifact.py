"""Writing artifacts: an optimized model as a directory ``lmbatch infer --model`` loads.

    config.json, tokenizer files, sentence-transformers pooling files (copied)
    model.safetensors   compact tensors: factors, codebooks, int8 weights, bitmasks,
                        or bitsandbytes' own (int8/nf4)
    lmbatch.json        recipe, per-step metrics, base fingerprint, and what to rebuild

Where nothing needs rebuilding (distilled, FFN-pruned, fp16/bf16, int8/nf4) the
directory is a plain transformers checkpoint. Otherwise
``actors.loading.load_artifact`` builds the model from its config, puts the recorded
module kinds and shapes in place, then loads the tensors. Reading the format
(``actors/artifact.py``) is the actors' business; writing it is this module's.
Safetensors only: an artifact never holds a pickle.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from lmbatch.actors.artifact import META_FILE, ArtifactMeta
from lmbatch.actors.layers import module_meta
from lmbatch.actors.loading import load_model
from lmbatch.actors.model_info import ModelSpec
from lmbatch.actors.sentence import module_folders
from lmbatch.actors.tasks import module_weights

PICKLED = "pytorch_model.bin"  # a sentence-transformers module's older weights
# Files of the base model an artifact keeps as they are: tokenizer and pooling.
COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)


def save_artifact(
    model: PreTrainedModel,
    out: Path,
    spec: ModelSpec,
    meta: ArtifactMeta,
    storage: dict[str, str],
) -> None:
    """Write ``model`` and ``meta`` to ``out`` (created, or replaced if there);
    ``spec`` is the original model's, whose tokenizer and modules it keeps."""
    base = Path(spec.path)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    plain = config_modules(model)
    meta.rebuild = rebuild_entries(model, plain)
    state, meta.aliases = _untied(model.state_dict())
    _as_conv1d(state, model, plain)
    meta.sparse = {}
    for key in storage:
        if key in state:
            meta.sparse[key] = list(state[key].shape)
            state.update(to_bitmask(key, state.pop(key)))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out)
    for name in COPIED:
        if (base / name).is_file():
            shutil.copy(base / name, out / name)
    for code in base.glob("*.py"):  # a model's own code (auto_map), which it needs
        shutil.copy(code, out / code.name)
    for folder in module_folders(base):  # sentence-transformers' Pooling, Dense...
        shutil.copytree(base / folder, out / folder, ignore=_pickles)
        _unpickled(base / folder, out / folder)
    (out / META_FILE).write_text(json.dumps(meta.__dict__, indent=2) + "\n")
    if meta.quantization:
        _store_quantised(out, spec)


def _store_quantised(out: Path, spec: ModelSpec) -> None:
    """Replace an int8/nf4 artifact's fp32 weights by bitsandbytes' own (int8 rows
    and their scales; nf4 nibbles and block absmax): the file shrinks as the model
    does, and loads with no quantising, as any pre-quantised checkpoint does.

    Quantised on CPU wherever the recipe ran: its 4-bit kernels keep layers narrower
    than their blocks in full precision, so the artifact runs on CPU and GPU alike.
    Before any forward pass: bitsandbytes repacks 4-bit weights for its CPU kernel on
    the first, and what it would save after that has lost precision.
    """
    model = load_model(replace(spec, path=str(out), precision="auto"), "cpu")
    model.save_pretrained(out)


def _pickles(folder: str, names: list[str]) -> list[str]:
    return [name for name in names if name == PICKLED]


def _unpickled(source: Path, target: Path) -> None:
    """A module's pickle weights (an older Dense module's, which --allow-pickle
    trusted) as safetensors, tensors only: an artifact never holds a pickle."""
    if (source / PICKLED).is_file() and not (source / "model.safetensors").is_file():
        state = module_weights(source / PICKLED)
        save_file(
            {k: v.contiguous() for k, v in state.items()},
            str(target / "model.safetensors"),
            metadata={"format": "pt"},
        )


def config_modules(model: PreTrainedModel) -> dict[str, nn.Module]:
    """The modules the config alone builds (on the meta device: no memory), by name."""
    with torch.device("meta"):
        skeleton = type(model)(model.config)
    return dict(skeleton.named_modules())


def rebuild_entries(
    model: PreTrainedModel, plain: dict[str, nn.Module]
) -> dict[str, dict]:
    """Modules whose kind or shape differs from what the config builds (``plain``),
    parents before children (a low-rank factor may itself be int8)."""
    entries: dict[str, dict] = {}
    for name, module in model.named_modules():
        meta = module_meta(module)
        if meta is None:
            continue
        if meta["kind"] == "linear" and name.rpartition(".")[0] in entries:
            continue  # a plain part its lmbatch parent builds itself
        ref = plain.get(name)
        if _is_conv1d(module, ref):
            continue  # stored as the Conv1D it was (_as_conv1d)
        if (
            meta["kind"] != "linear"
            or not isinstance(ref, nn.Linear)
            or list(ref.weight.shape) != meta["shape"]
        ):
            entries[name] = meta
    return entries


def _is_conv1d(module: nn.Module, ref: nn.Module | None) -> bool:
    """A plain Linear made of the config's Conv1D (``conv1d_as_linear``), its shape
    unchanged."""
    return (
        type(module) is nn.Linear
        and isinstance(ref, Conv1D)
        and list(ref.weight.shape) == list(module.weight.shape)[::-1]
    )


def _as_conv1d(
    state: dict[str, torch.Tensor], model: nn.Module, plain: dict[str, nn.Module]
) -> None:
    """A GPT-2's Linears that are still plain go back to Conv1D's (in, out) weights:
    the artifact stays the model's own checkpoint, which bitsandbytes quantises and
    transformers loads without lmbatch."""
    for name, module in model.named_modules():
        if _is_conv1d(module, plain.get(name)):
            key = f"{name}.weight"
            state[key] = state[key].t().contiguous()


def to_bitmask(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Non-zeros plus one bit per weight: what unstructured sparsity really costs."""
    flat = tensor.reshape(-1)
    mask = flat != 0
    bits = np.packbits(mask.numpy())
    return {
        f"{key}.__values": flat[mask].contiguous(),
        f"{key}.__mask": torch.from_numpy(bits),
    }


def _untied(state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, str]]:
    """Safetensors refuses shared tensors: keep each storage once, name the others."""
    kept: dict[tuple, str] = {}
    out, aliases = {}, {}
    for key, tensor in state.items():
        if tensor is None:
            continue
        ident = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
        )
        if ident in kept and tensor.numel():
            aliases[key] = kept[ident]
            continue
        kept[ident] = key
        out[key] = tensor.detach().cpu().contiguous()
    return out, aliases
