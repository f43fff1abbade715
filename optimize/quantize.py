"""Quantization: fp16/bf16, int8 on torch's CPU kernels (dynamic or static activations,
optionally quantization-aware fine-tuned), or bitsandbytes int8/nf4.

``skip`` globs keep chosen modules in fp32, making a mixed model. bitsandbytes layers
are not built here: their settings go into the artifact, whose writer has
``load_model`` quantise by them and stores what bitsandbytes holds
(``optimize/artifact.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from lmbatch.actors.layers import CastLinear, Int8Linear, quantize_rows, replace_module
from lmbatch.errors import UserError
from lmbatch.optimize.calibrate import linear_stats, make_batches, target_linears
from lmbatch.optimize.context import Context
from lmbatch.optimize.recipe import Distill, Quantize

DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


def apply_quantize(
    model: PreTrainedModel, step: Quantize, ctx: Context, where: str
) -> PreTrainedModel:
    names = target_linears(model, step.skip)
    if step.method in DTYPES:
        if not step.skip:
            ctx.dtype = step.method
            return model.to(getattr(torch, DTYPES[step.method]))
        for name in names:
            to_cast(model, name, DTYPES[step.method])
        return model
    if step.method in ("int8", "nf4"):
        ctx.quantization = {
            "method": step.method,
            "skip": [
                n
                for n, _ in model.named_modules()
                if n and n not in names and isinstance(_, torch.nn.Linear)
            ],
            "int8_threshold": step.int8_threshold,
        }
        ctx.notes.append(f"{step.method}: bitsandbytes, quantised on CPU")
        return model
    if ctx.device != "cpu":
        raise UserError(
            f"{where}.method", "cpu-int8 runs on CPU kernels; on a GPU use int8 or nf4"
        )
    if step.qat:
        quantization_aware_finetune(model, names, step, ctx)
    ranges = {}
    if step.activations == "static":
        stats = linear_stats(model, ctx.batches, names)
        ranges = {n: (s.in_absmax, s.out_absmax) for n, s in stats.items()}
    for name in names:
        replace_module(
            model,
            name,
            Int8Linear.from_linear(
                model.get_submodule(name), step.activations, ranges.get(name)
            ),
        )
    return model


def to_cast(model: PreTrainedModel, name: str, dtype: str) -> None:
    replace_module(
        model, name, CastLinear.from_linear(model.get_submodule(name), dtype)
    )


def quantization_aware_finetune(
    model: PreTrainedModel, names: list[str], step: Quantize, ctx: Context
) -> None:
    """Train the model through its int8 rounding against the original, then leave
    plain Linears holding the trained weights for the int8 conversion."""
    from lmbatch.optimize.distill import distill_loss, train

    for name in names:
        linear = model.get_submodule(name)
        fake = FakeQuantLinear(
            linear.in_features, linear.out_features, bias=linear.bias is not None
        )
        fake.load_state_dict(linear.state_dict())
        replace_module(model, name, fake)
    config = Distill(steps=step.qat.steps, lr=step.qat.lr)
    batches = make_batches(
        ctx.tokenizer, ctx.calibration, config.max_length, config.batch_size, ctx.device
    )
    train(model, ctx, batches, step.qat, lambda s, b: distill_loss(s, b, config, ctx))
    for name in names:
        fake = model.get_submodule(name)
        linear = torch.nn.Linear(
            fake.in_features, fake.out_features, bias=fake.bias is not None
        )
        linear.load_state_dict(fake.state_dict())
        replace_module(model, name, linear)


class FakeQuantLinear(nn.Linear):
    """A Linear trained through its own int8 rounding (straight-through estimator):
    quantization-aware fine-tuning, turned into an ``Int8Linear`` afterwards."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, scale = quantize_rows(self.weight.detach())
        w_q = q.float() * scale[:, None]
        w = self.weight + (w_q - self.weight).detach()
        return F.linear(x, w, self.bias)
