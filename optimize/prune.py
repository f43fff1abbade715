"""Pruning: zero weights (magnitude, Wanda-style activation), or remove whole heads and
feed-forward neurons (structured) so the tensors and the model really shrink.

Unstructured and N:M sparsity save nothing on dense CPU/GPU kernels: the report says so.
With ``storage: bitmask`` the artifact stores the non-zeros and a bit per weight, so the
file does shrink. Iterative pruning reaches the target in ``rounds``, with distillation
against the original between rounds.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from lmbatch.optimize.arch import Block, blocks
from lmbatch.optimize.calibrate import linear_stats, target_linears
from lmbatch.optimize.context import Context
from lmbatch.optimize.recipe import Distill, Prune, nm_pattern


def apply_prune(
    model: PreTrainedModel, step: Prune, ctx: Context, where: str
) -> PreTrainedModel:
    if step.method == "structured":
        prune_structured(model, step, ctx, where)
        return model
    for r in range(1, step.rounds + 1):
        # Cubic schedule (Zhu & Gupta): prune fast while there is slack, then gently.
        sparsity = step.sparsity * (1 - (1 - r / step.rounds) ** 3)
        prune_unstructured(model, step, ctx, sparsity)
        if step.finetune_steps:
            from lmbatch.optimize.distill import apply_distill

            model = apply_distill(model, Distill(steps=step.finetune_steps), ctx, where)
    if step.storage == "bitmask":
        ctx.storage.update(dict.fromkeys(ctx.masks, "bitmask"))
    ctx.notes.append("unstructured sparsity: same speed on dense kernels")
    return model


def prune_unstructured(
    model: nn.Module, step: Prune, ctx: Context, sparsity: float
) -> None:
    names = target_linears(model, step.skip)
    stats = (
        linear_stats(model, ctx.batches, names) if step.method == "activation" else {}
    )
    scores = {}
    for name in names:
        w = model.get_submodule(name).weight.detach().float().abs()
        if name in stats:  # Wanda: |W_ij| * ||X_j||
            w = w * stats[name].sq_norm.sqrt()[None, :]
        scores[name] = w
    if step.pattern != "unstructured":
        n, m = nm_pattern(step.pattern)
        masks = {k: nm_mask(s, n, m) for k, s in scores.items()}
    elif step.scope == "global":
        everything = torch.cat([s.reshape(-1) for s in scores.values()])
        cut = torch.kthvalue(everything, max(1, int(sparsity * everything.numel())))
        masks = {k: s > cut.values for k, s in scores.items()}
    else:
        masks = {k: row_mask(s, sparsity) for k, s in scores.items()}
    for name, mask in masks.items():
        key = f"{name}.weight"
        ctx.masks[key] = mask & ctx.masks.get(key, torch.ones_like(mask))
    ctx.apply_masks(model)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Drop the lowest-scoring ``sparsity`` of each output row (Wanda's comparison
    group: rows compete only with themselves)."""
    k = int(scores.shape[1] * sparsity)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k:
        drop = scores.topk(k, dim=1, largest=False).indices
        mask.scatter_(1, drop, False)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` best of every ``m`` consecutive inputs of each row."""
    rows, cols = scores.shape
    usable = cols - cols % m
    mask = torch.ones_like(scores, dtype=torch.bool)
    groups = scores[:, :usable].reshape(rows, -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    mask[:, :usable] = keep.reshape(rows, usable)
    return mask


def prune_structured(
    model: PreTrainedModel, step: Prune, ctx: Context, where: str
) -> None:
    """Remove the least important heads and FFN neurons, the same count per block.

    Importance of an input column c of an output projection: ||W[:, c]|| x ||x_c||
    over calibration text, the output that column can carry. A head sums its columns.
    """
    layout = blocks(model, f"{where}.method")
    outs = [b.attn_out for b in layout] + [b.ffn_out for b in layout]
    stats = linear_stats(model, ctx.batches, outs)
    for block in layout:
        if step.heads:
            _prune_heads(
                model, block, step.heads, _importance(model, block.attn_out, stats)
            )
        if step.ffn:
            _prune_ffn(model, block, step.ffn, _importance(model, block.ffn_out, stats))
    if step.ffn and hasattr(model.config, "intermediate_size"):
        model.config.intermediate_size = model.get_submodule(
            layout[0].ffn_out
        ).in_features


def _importance(model: nn.Module, name: str, stats: dict) -> torch.Tensor:
    w = model.get_submodule(name).weight.detach().float()
    return w.norm(dim=0) * stats[name].sq_norm.sqrt()


def _prune_ffn(
    model: nn.Module, block: Block, fraction: float, importance: torch.Tensor
) -> None:
    keep = _keep(importance, fraction)
    for name in block.ffn_in:
        _slice(model, name, rows=keep)
    _slice(model, block.ffn_out, cols=keep)


def _prune_heads(
    model: nn.Module, block: Block, fraction: float, importance: torch.Tensor
) -> None:
    """Heads go by key/value group, so grouped-query attention stays consistent."""
    unit = block.head_dim * block.groups  # query columns per key/value head
    per_unit = importance.reshape(-1, unit).sum(dim=1)
    units = _keep(per_unit, fraction)
    q = _expand(units, unit)
    kv = _expand(units, block.head_dim)
    for name in block.queries:
        _slice(model, name, rows=q)
    for name in block.kv:
        _slice(model, name, rows=kv)
    _slice(model, block.attn_out, cols=q)


def _keep(importance: torch.Tensor, fraction: float) -> torch.Tensor:
    n = len(importance)
    kept = max(1, n - int(round(n * fraction)))
    return importance.topk(kept).indices.sort().values


def _expand(units: torch.Tensor, width: int) -> torch.Tensor:
    return (
        units[:, None] * width + torch.arange(width, device=units.device)[None, :]
    ).reshape(-1)


def _slice(
    model: nn.Module,
    name: str,
    rows: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
) -> None:
    """Shrink a Linear in place to the kept output rows or input columns."""
    linear = model.get_submodule(name)
    w = linear.weight.data
    if rows is not None:
        w = w[rows]
        linear.out_features = len(rows)
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data[rows].clone())
    if cols is not None:
        w = w[:, cols]
        linear.in_features = len(cols)
    linear.weight = nn.Parameter(w.clone())
