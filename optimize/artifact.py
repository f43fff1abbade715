"""Artifacts: an optimized model as a directory that ``lmbatch infer --model`` loads.

    config.json, tokenizer files, sentence-transformers pooling files (copied)
    model.safetensors   compact tensors: factors, codebooks, int8 weights, bitmasks
    lmbatch.json        recipe, per-step metrics, base fingerprint, and what to rebuild

Where nothing needs rebuilding (distilled, FFN-pruned, fp16/bf16) the directory is a
plain transformers checkpoint. Otherwise ``load_artifact`` builds the model from its
config, puts the recorded module kinds and shapes in place, then loads the tensors.
Safetensors only: an artifact never holds a pickle.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from actors.errors import UserError
from optimize.layers import module_meta, rebuild, replace_module

META_FILE = "lmbatch.json"
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


@dataclass
class ArtifactMeta:
    base_model: str
    base_fingerprint: str
    task: str
    recipe: list[dict]
    precision: str = "fp32"  # fp32 | fp16 | bf16 | int8 | nf4 | mixed
    rebuild: dict[str, dict] = field(default_factory=dict)  # module -> kind, shapes
    sparse: dict[str, list[int]] = field(default_factory=dict)  # bitmask tensors
    aliases: dict[str, str] = field(default_factory=dict)  # tied tensor -> kept name
    quantization: dict | None = None  # bitsandbytes settings for load_model
    steps: list[dict] = field(default_factory=list)  # per-step metrics
    format: int = 1

    @classmethod
    def read(cls, path: str | Path) -> ArtifactMeta | None:
        file = Path(path) / META_FILE
        if not file.is_file():
            return None
        return cls(**json.loads(file.read_text()))


def save_artifact(
    model: PreTrainedModel,
    out: Path,
    base: Path,
    meta: ArtifactMeta,
    storage: dict[str, str],
) -> None:
    """Write ``model`` and ``meta`` to ``out`` (created, or replaced if there)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    meta.rebuild = rebuild_entries(model)
    state, meta.aliases = _untied(model.state_dict())
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
    for pooling in base.glob("*_Pooling"):
        shutil.copytree(pooling, out / pooling.name)
    (out / META_FILE).write_text(json.dumps(meta.__dict__, indent=2) + "\n")


def load_artifact(
    path: str, cls, meta: ArtifactMeta, dtype: torch.dtype | None
) -> PreTrainedModel:
    """Rebuild an artifact whose modules the config alone does not describe."""
    config = AutoConfig.from_pretrained(path)
    model = cls.from_config(config)
    for name, entry in meta.rebuild.items():
        try:
            replace_module(model, name, rebuild(entry))
        except (AttributeError, ValueError, KeyError) as e:
            raise UserError("--model", f"{path}/{META_FILE}: {name}: {e}") from None
    state = load_file(str(Path(path) / "model.safetensors"))
    for key, shape in meta.sparse.items():
        state[key] = from_bitmask(state, key, shape)
    for alias, kept in meta.aliases.items():
        state[alias] = state[kept]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            "--model",
            f"{path} does not match its lmbatch.json: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}",
        )
    if dtype is not None:
        model = model.to(dtype)
    return model


def rebuild_entries(model: PreTrainedModel) -> dict[str, dict]:
    """Modules whose kind or shape differs from what the config builds, parents
    before children (a low-rank factor may itself be int8)."""
    with torch.device("meta"):
        skeleton = type(model)(model.config)
    plain = dict(skeleton.named_modules())
    entries: dict[str, dict] = {}
    for name, module in model.named_modules():
        meta = module_meta(module)
        if meta is None:
            continue
        if meta["kind"] == "linear" and name.rpartition(".")[0] in entries:
            continue  # a plain part its lmbatch parent builds itself
        ref = plain.get(name)
        if (
            meta["kind"] != "linear"
            or not isinstance(ref, nn.Linear)
            or list(ref.weight.shape) != meta["shape"]
        ):
            entries[name] = meta
    return entries


def fingerprint(path: Path) -> str:
    """sha256 of the base weight files: the artifact names what it came from."""
    digest = hashlib.sha256()
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def to_bitmask(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Non-zeros plus one bit per weight: what unstructured sparsity really costs."""
    flat = tensor.reshape(-1)
    mask = flat != 0
    bits = np.packbits(mask.numpy())
    return {
        f"{key}.__values": flat[mask].contiguous(),
        f"{key}.__mask": torch.from_numpy(bits),
    }


def from_bitmask(state: dict, key: str, shape: list[int]) -> torch.Tensor:
    values = state.pop(f"{key}.__values")
    bits = state.pop(f"{key}.__mask").numpy()
    n = int(np.prod(shape))
    mask = torch.from_numpy(np.unpackbits(bits)[:n].astype(bool))
    dense = torch.zeros(n, dtype=values.dtype)
    dense[mask] = values
    return dense.reshape(shape)


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
