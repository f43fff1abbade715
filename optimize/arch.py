"""Where the transformer blocks of a model family are, for the steps that reshape them.

Structured pruning needs each block's attention projections and feed-forward pair;
distillation into fewer layers needs the list of blocks. Families are known by their
module names, never guessed: one that is not here gets a clear error naming the step.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lmbatch.errors import UserError


@dataclass(frozen=True)
class Block:
    """Module names of one transformer block's parts, relative to the model."""

    queries: tuple[str, ...]  # projections whose outputs are split into heads
    kv: tuple[str, ...]  # key/value projections (equal to queries' heads unless GQA)
    attn_out: str  # projection back from the heads
    ffn_in: tuple[str, ...]  # up projections (gate and up for gated MLPs)
    ffn_out: str
    head_dim: int
    groups: int  # query heads per key/value head (1 unless grouped-query attention)


@dataclass(frozen=True)
class Family:
    layers: str  # the ModuleList of blocks
    queries: tuple[str, ...]
    kv: tuple[str, ...]
    attn_out: str
    ffn_in: tuple[str, ...]
    ffn_out: str
    layers_attr: str  # config field holding the number of blocks


FAMILIES = {
    "bert": Family(
        "encoder.layer",
        ("attention.self.query",),
        ("attention.self.key", "attention.self.value"),
        "attention.output.dense",
        ("intermediate.dense",),
        "output.dense",
        "num_hidden_layers",
    ),
    "llama": Family(
        "layers",
        ("self_attn.q_proj",),
        ("self_attn.k_proj", "self_attn.v_proj"),
        "self_attn.o_proj",
        ("mlp.gate_proj", "mlp.up_proj"),
        "mlp.down_proj",
        "num_hidden_layers",
    ),
}
# Families whose blocks can be listed (for layer-dropping distillation) but not pruned:
LAYER_LISTS = {"gpt2": ("h", "n_layer")}


def family(model: nn.Module, where: str) -> tuple[str, Family]:
    """The model's family; ``where`` names the recipe field for the error."""
    for fam in FAMILIES.values():
        prefix = _prefix(model, fam.layers)
        if prefix is not None:
            return prefix, fam
    raise UserError(
        where,
        f"{type(model).__name__} is not a BERT- or Llama-style model; "
        "structured pruning knows only those",
    )


def blocks(model: nn.Module, where: str) -> list[Block]:
    prefix, fam = family(model, where)
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    groups = heads // (getattr(config, "num_key_value_heads", None) or heads)
    layers = model.get_submodule(prefix + fam.layers)
    out = []
    for i in range(len(layers)):
        base = f"{prefix}{fam.layers}.{i}."
        out.append(
            Block(
                queries=tuple(base + q for q in fam.queries),
                kv=tuple(base + k for k in fam.kv),
                attn_out=base + fam.attn_out,
                ffn_in=tuple(base + f for f in fam.ffn_in),
                ffn_out=base + fam.ffn_out,
                head_dim=head_dim,
                groups=groups,
            )
        )
    return out


def layer_list(model: nn.Module, where: str) -> tuple[str, str]:
    """(module path of the block list, config field counting blocks)."""
    for fam in FAMILIES.values():
        prefix = _prefix(model, fam.layers)
        if prefix is not None:
            return prefix + fam.layers, fam.layers_attr
    for path, attr in LAYER_LISTS.values():
        prefix = _prefix(model, path)
        if prefix is not None:
            return prefix + path, attr
    raise UserError(
        where, f"cannot find the transformer blocks of {type(model).__name__}"
    )


def _prefix(model: nn.Module, path: str) -> str | None:
    """'' or the base-model prefix ('bert.', 'model.') under which ``path`` lives."""
    names = dict(model.named_modules())
    for prefix in ("", f"{getattr(model, 'base_model_prefix', '')}."):
        if isinstance(names.get(prefix + path), nn.ModuleList):
            return prefix
    return None
