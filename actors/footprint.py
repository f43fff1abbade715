"""What a model will hold on a GPU, read off its weight files' headers: no load.

The pool's GPU fraction must be known before any actor starts. Loading the model on a
GPU to measure it cost a whole model load (tens of seconds for a large model) before
the pool could start; the safetensors headers give every tensor's shape for free, and
the precision gives the bytes per weight. ``gpu_total_bytes`` asks one GPU of the
cluster how large it is, without loading anything onto it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from safetensors import safe_open

GPU_USABLE = 0.9  # of a GPU's memory; the rest: CUDA contexts and fragmentation
# Bytes per weight of a quantised Linear: LLM.int8 keeps one byte and an fp32 scale
# per row; NF4 half a byte plus its absmax per 64 weights (one byte, double quantised).
QUANTISED_BYTES = {"int8": 1.0, "nf4": 0.5 + 1 / 64}
FLOAT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# Tensors bitsandbytes leaves in the compute dtype besides 1-D ones: embeddings, and
# the modules load_model skips (loading.SKIP_QUANTIZE).
NOT_QUANTISED = re.compile(r"embed|wte|wpe|lm_head|classifier|score|pooler")


def model_bytes(path: str, precision: str, device: str = "cuda") -> int:
    """Bytes the weights of ``path`` take once loaded at ``precision`` on ``device``.

    ``precision`` must be concrete (not ``auto``); bitsandbytes computes in fp16 on a
    GPU and fp32 on CPU, which is what its unquantised tensors are held in.
    """
    compute = "fp32" if device == "cpu" else "fp16"
    dense = FLOAT_BYTES.get(precision, FLOAT_BYTES[compute])
    total = 0.0
    for name, shape, integer_bytes in _tensors(Path(path)):
        count = math.prod(shape)
        if integer_bytes:  # ids, int8 layers, codebook indices: kept as stored
            total += count * integer_bytes
        elif precision in QUANTISED_BYTES and _quantised(name, shape):
            total += count * QUANTISED_BYTES[precision]
        else:
            total += count * dense
    return int(total)


def gpu_total_bytes() -> int:
    """The memory of the GPU this process was given (run as a Ray task with a GPU);
    0 where Ray gave a GPU but CUDA is not there (a fake GPU node, a broken driver)."""
    import torch

    return int(torch.cuda.mem_get_info()[1]) if torch.cuda.is_available() else 0


def _tensors(path: Path):
    """(name, shape, bytes per element if integer else 0) of every stored tensor."""
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="np") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                dtype = piece.get_dtype()
                integer = _integer_bytes(dtype)
                yield name, piece.get_shape(), integer


def _integer_bytes(dtype: str) -> int:
    """Bytes of an integer or bool safetensors dtype (I8, U8, I64, BOOL...); 0 for
    floats."""
    if dtype == "BOOL":
        return 1
    match = re.fullmatch(r"[IU](\d+)", dtype)
    return int(match.group(1)) // 8 if match else 0


def _quantised(name: str, shape: list[int]) -> bool:
    return (
        len(shape) == 2 and name.endswith("weight") and not NOT_QUANTISED.search(name)
    )
