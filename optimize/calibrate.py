"""Calibration text as model batches, and what the Linears see when it runs through.

Activation-aware pruning (Wanda), activation-aware low rank, static int8 scales and
structured importance all need the same thing: per Linear, the norm of each input
feature and the largest input/output magnitudes over real text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

Batch = dict[str, torch.Tensor]
Row = str | tuple[str, str]  # a text, or a text pair (--pair-column: a cross-encoder's)


def split(rows: list[Row]) -> tuple[list[str], list[str] | None]:
    """(texts, their pairs or None): rows as a tokenizer takes them."""
    if not rows or isinstance(rows[0], str):
        return rows, None
    return [r[0] for r in rows], [r[1] for r in rows]


def make_batches(
    tokenizer, rows: list[Row], max_length: int, batch_size: int, device: str = "cpu"
) -> list[Batch]:
    """Length-sorted batches, so that padding costs little. A text pair is one
    sequence in the tokenizer's pair template, cut longest first, with token types
    where the tokenizer gives them, as an infer job's classify reads it."""
    rows = sorted(rows, key=lambda r: len(r) if isinstance(r, str) else len("".join(r)))
    batches = []
    for i in range(0, len(rows), batch_size):
        texts, pairs = split(rows[i : i + batch_size])
        enc = tokenizer(
            texts,
            pairs,
            padding=True,
            truncation=True,
            # no more than the model's positions (run_recipe sets the tokenizer's)
            max_length=min(max_length, tokenizer.model_max_length),
            return_tensors="pt",
        )
        keys = ["input_ids", "attention_mask"]
        if pairs is not None and "token_type_ids" in enc:
            keys.append("token_type_ids")
        batches.append({k: enc[k].to(device) for k in keys})
    return batches


@dataclass
class InputStats:
    """Over every calibration token that is not padding."""

    sq_norm: torch.Tensor  # per input feature: sum of x_j^2
    in_absmax: float = 0.0
    out_absmax: float = 0.0


def linear_stats(
    model: nn.Module, batches: list[Batch], names: list[str]
) -> dict[str, InputStats]:
    """Run the calibration batches, recording each named Linear's input statistics."""
    stats: dict[str, InputStats] = {}
    mask_holder: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach().float()
            keep = mask_holder["mask"].reshape(-1).bool()
            if x.shape[:-1].numel() == keep.numel():
                x2 = x.reshape(-1, x.shape[-1])[keep]
                y = output.detach().float().reshape(-1, output.shape[-1])[keep]
            else:
                x2, y = x.reshape(-1, x.shape[-1]), output.detach().float()
            s = stats.setdefault(
                name, InputStats(torch.zeros(x.shape[-1], device=x.device))
            )
            s.sq_norm += (x2 * x2).sum(dim=0)
            s.in_absmax = max(s.in_absmax, float(x2.abs().max()))
            s.out_absmax = max(s.out_absmax, float(y.abs().max()))

        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.inference_mode():
            for batch in batches:
                mask_holder["mask"] = batch["attention_mask"]
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    return stats


def target_linears(model: nn.Module, skip: tuple[str, ...]) -> list[str]:
    """Every Linear a step may change: not the heads, poolers or ``skip`` globs."""
    from fnmatch import fnmatch

    from lmbatch.actors.loading import SKIP_QUANTIZE

    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and not any(part in name.split(".") for part in SKIP_QUANTIZE)
        and not any(fnmatch(name, glob) for glob in skip)
    ]
