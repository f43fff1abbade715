"""Weight sharing: each Linear's weights clustered by k-means into a codebook of at
most 256 values; the artifact stores the codebook and one uint8 index per weight.

Saves bytes on disk and in transfer, not compute: the dense weight is decoded at load.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from lmbatch.actors.layers import SharedLinear, replace_module
from lmbatch.optimize.calibrate import target_linears
from lmbatch.optimize.context import Context
from lmbatch.optimize.recipe import Share


def apply_share(
    model: PreTrainedModel, step: Share, ctx: Context, where: str
) -> PreTrainedModel:
    for name in target_linears(model, step.skip):
        linear = model.get_submodule(name)
        codebook, indices = kmeans_1d(
            linear.weight.detach().float().reshape(-1), step.clusters, step.iterations
        )
        module = SharedLinear(
            linear.in_features,
            linear.out_features,
            len(codebook),
            linear.bias is not None,
        )
        module.codebook = codebook
        module.indices = indices.reshape(linear.weight.shape).to(torch.uint8)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.data.float())
        replace_module(model, name, module)
    ctx.notes.append("weight sharing: smaller file, same compute")
    return model


def kmeans_1d(
    values: torch.Tensor, clusters: int, iterations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on scalars, started from quantiles (dense where weights are).

    In one dimension the nearest centroid is found by binary search between sorted
    centroids' midpoints, so each iteration is O(n log k), not O(n k).
    """
    qs = torch.linspace(0, 1, clusters, device=values.device)
    sample = (
        values[torch.randperm(len(values), device=values.device)[:200_000]]
        if len(values) > 200_000
        else values
    )
    centroids = torch.quantile(sample, qs).unique()
    for _ in range(iterations):
        index = nearest(values, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, index, values)
        counts = torch.zeros_like(centroids).index_add_(
            0, index, torch.ones_like(values)
        )
        moved = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        centroids, _ = moved.sort()
    return centroids, nearest(values, centroids)


def nearest(values: torch.Tensor, sorted_centroids: torch.Tensor) -> torch.Tensor:
    mids = (sorted_centroids[1:] + sorted_centroids[:-1]) / 2
    return torch.searchsorted(mids, values)
