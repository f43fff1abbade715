"""The modules an artifact may hold in place of ``nn.Linear``, and how each is rebuilt.

Optimize steps put them in place; an artifact's ``lmbatch.json`` lists, per replaced
module, its ``kind`` and shapes; ``loading.load_artifact`` builds the model from its
config, swaps in an empty module of that kind (``rebuild``), then loads the
safetensors. Each kind keeps its compact form
in its state dict (factors, codebook and uint8 indices, int8 weights and scales), so the
file on disk is really smaller.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D


class LowRankLinear(nn.Module):
    """``W ~= up @ down``: two thin GEMMs instead of one wide one."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    @classmethod
    def from_factors(
        cls, linear: nn.Linear, down: torch.Tensor, up: torch.Tensor
    ) -> LowRankLinear:
        """``linear`` replaced by ``up @ down`` (its bias moves to ``up``)."""
        module = cls(
            linear.in_features,
            linear.out_features,
            down.shape[0],
            linear.bias is not None,
        )
        module.down.weight.data.copy_(down)
        module.up.weight.data.copy_(up)
        if linear.bias is not None:
            module.up.bias.data.copy_(linear.bias.data)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def meta(self) -> dict:
        return {
            "kind": "lowrank",
            "shape": [self.out_features, self.in_features],
            "rank": self.rank,
            "bias": self.up.bias is not None,
        }


class SharedLinear(nn.Module):
    """Weights drawn from a small codebook: ``W[i, j] = codebook[indices[i, j]]``.

    The artifact stores the codebook and uint8 indices (a quarter of fp32); the dense
    weight is decoded once, into a buffer that is not saved.
    """

    def __init__(self, in_features: int, out_features: int, clusters: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("codebook", torch.zeros(clusters))
        self.register_buffer(
            "indices", torch.zeros(out_features, in_features, dtype=torch.uint8)
        )
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_buffer("weight", torch.empty(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.numel() == 0:
            self.weight = self.codebook[self.indices.long()].to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.weight = torch.empty(0)  # decode again from what was loaded

    def meta(self) -> dict:
        return {
            "kind": "shared",
            "shape": [self.out_features, self.in_features],
            "clusters": self.codebook.numel(),
            "bias": self.bias is not None,
        }


class CastLinear(nn.Module):
    """A Linear held and computed in fp16/bf16 inside an fp32 model (a mixed model)."""

    def __init__(self, in_features: int, out_features: int, dtype: str, bias: bool):
        super().__init__()
        self.dtype_name = dtype
        self.linear = nn.Linear(
            in_features, out_features, bias=bias, dtype=getattr(torch, dtype)
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: str) -> CastLinear:
        cast = cls(
            linear.in_features, linear.out_features, dtype, linear.bias is not None
        )
        cast.linear.load_state_dict(linear.state_dict())
        return cast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.to(self.linear.weight.dtype)).to(x.dtype)

    def meta(self) -> dict:
        w = self.linear.weight
        return {
            "kind": "cast",
            "shape": list(w.shape),
            "dtype": self.dtype_name,
            "bias": self.linear.bias is not None,
        }


@contextlib.contextmanager
def quantized_tensors() -> Iterator[None]:
    """torch warns, in every cpu-int8 job, that its quantized tensors are deprecated
    (pytorch#184982); they are still what its int8 CPU kernels take, and nothing a
    job's user can act on. ``quantize_dynamic_int8`` silences the same."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.quantize_per_tensor")
        yield


class Int8Linear(nn.Module):
    """Int8 weights with per-output-channel scales, on torch's int8 CPU kernels (fbgemm
    or onednn).

    ``activations="dynamic"`` quantizes each batch's input on the fly; ``"static"``
    uses input and output ranges calibrated on real text. The int8 weights and the
    scales are what the artifact stores.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        activations: str = "dynamic",
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.activations = activations
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features, dtype=torch.int8)
        )
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        # static only: the symmetric ranges of inputs and outputs seen in calibration
        self.register_buffer("ranges", torch.ones(2))
        self._packed = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        activations: str = "dynamic",
        ranges: tuple[float, float] | None = None,
    ) -> Int8Linear:
        w = linear.weight.detach().float()
        module = cls(w.shape[1], w.shape[0], linear.bias is not None, activations)
        module.qweight, module.scale = quantize_rows(w)
        if linear.bias is not None:
            module.bias = linear.bias.detach().float().clone()
        if ranges is not None:
            module.ranges = torch.tensor([max(r, 1e-6) for r in ranges])
        return module

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._packed = None

    def packed(self):
        if self._packed is None:
            with quantized_tensors():
                q = torch._make_per_channel_quantized_tensor(
                    self.qweight,
                    self.scale.double(),
                    torch.zeros(self.out_features, dtype=torch.long),
                    0,
                )
            self._packed = torch.ops.quantized.linear_prepack(q, self.bias)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features).float()
        if self.activations == "dynamic":
            y = torch.ops.quantized.linear_dynamic(flat, self.packed(), True)
        else:
            x_range, y_range = self.ranges.tolist()
            with quantized_tensors():
                xq = torch.quantize_per_tensor(flat, x_range / 127, 128, torch.quint8)
            y = torch.ops.quantized.linear(
                xq, self.packed(), y_range / 127, 128
            ).dequantize()
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def meta(self) -> dict:
        return {
            "kind": "int8",
            "shape": [self.out_features, self.in_features],
            "activations": self.activations,
            "bias": self.bias is not None,
        }


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: (int8 weights, fp32 scales)."""
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def rebuild(meta: dict) -> nn.Module:
    """An empty module of ``meta['kind']`` with the recorded shapes, to load into."""
    out_features, in_features = meta["shape"]
    kind, bias = meta["kind"], meta.get("bias", True)
    if kind == "linear":
        return nn.Linear(in_features, out_features, bias=bias)
    if kind == "lowrank":
        return LowRankLinear(in_features, out_features, meta["rank"], bias)
    if kind == "shared":
        return SharedLinear(in_features, out_features, meta["clusters"], bias)
    if kind == "cast":
        return CastLinear(in_features, out_features, meta["dtype"], bias)
    if kind == "int8":
        return Int8Linear(in_features, out_features, bias, meta["activations"])
    raise ValueError(f"unknown module kind {kind!r} in lmbatch.json")


def module_meta(module: nn.Module) -> dict | None:
    """How to rebuild ``module``, or None for a module the config already builds."""
    if hasattr(module, "meta"):
        return module.meta()
    if isinstance(module, nn.Linear):
        return {
            "kind": "linear",
            "shape": list(module.weight.shape),
            "bias": module.bias is not None,
        }
    return None


def conv1d_as_linear(model: nn.Module) -> nn.Module:
    """GPT-2's ``Conv1D`` layers as the ``nn.Linear`` they are (the weight stored
    transposed, (in, out)), in place: torch's int8 kernels and every optimize step
    change Linears only, and would leave a GPT-2's blocks untouched. Exact: the same
    product, the same numbers."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            weight = module.weight
            linear = nn.Linear(
                module.nx, module.nf, device=weight.device, dtype=weight.dtype
            )
            with torch.no_grad():
                linear.weight.copy_(weight.t())
                linear.bias.copy_(module.bias)
            linear.requires_grad_(weight.requires_grad)
            replace_module(model, name, linear)
    return model


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``name`` is, on the device the old module was on."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    tensor = next(iter([*old.parameters(), *old.buffers()]), None)
    if tensor is not None:
        new.to(tensor.device)
    setattr(parent, child, new)
