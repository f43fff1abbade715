"""Low-rank factorization: ``W ~= U_r S_r V_r^T`` as two thin Linears.

With ``activation_aware`` the SVD is of ``W diag(s)``, ``s_j`` the norm of input feature
``j`` over calibration text (ASVD), so the kept directions are the ones real inputs
excite; the scaling is undone in the second factor. A layer whose factors would not
save ``min_saving`` of its weights keeps its dense weight.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from lmbatch.actors.layers import LowRankLinear, replace_module
from lmbatch.optimize.calibrate import linear_stats, target_linears
from lmbatch.optimize.context import Context
from lmbatch.optimize.recipe import Lowrank


def apply_lowrank(
    model: PreTrainedModel, step: Lowrank, ctx: Context, where: str
) -> PreTrainedModel:
    names = target_linears(model, step.skip)
    stats = linear_stats(model, ctx.batches, names) if step.activation_aware else {}
    done = 0
    for name in names:
        linear = model.get_submodule(name)
        scale = stats[name].sq_norm.sqrt().clamp(min=1e-6) if name in stats else None
        factors = factorize(linear.weight.detach().float(), step, scale)
        if factors is None:
            continue
        replace_module(model, name, LowRankLinear.from_factors(linear, *factors))
        done += 1
    ctx.notes.append(f"{done} of {len(names)} Linears factorized")
    return model


def factorize(
    w: torch.Tensor, step: Lowrank, scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(down: r x in, up: out x r), or None when the factors would not pay."""
    out_f, in_f = w.shape
    scaled = w * scale[None, :] if scale is not None else w
    u, s, vh = torch.linalg.svd(scaled, full_matrices=False)
    if step.rank_ratio is not None:
        rank = max(1, int(round(step.rank_ratio * len(s))))
    else:
        energy = torch.cumsum(s**2, 0) / (s**2).sum()
        wanted = torch.tensor(step.energy, device=energy.device)
        rank = int(torch.searchsorted(energy, wanted).item()) + 1
    if rank * (in_f + out_f) > (1 - step.min_saving) * in_f * out_f:
        return None
    root = s[:rank].sqrt()
    down = root[:, None] * vh[:rank]
    if scale is not None:
        down = down / scale[None, :]
    return down, u[:, :rank] * root[None, :]
