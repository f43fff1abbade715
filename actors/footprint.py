"""What a model will hold on a GPU (or a CPU actor), read off its weight files' headers:
no load.

The pool's GPU fraction must be known before any actor starts. Loading the model on a
GPU to measure it cost a whole model load (tens of seconds for a large model) before
the pool could start; the safetensors headers give every tensor's shape for free, and
the precision gives the bytes per weight. ``gpu_total_bytes`` asks a GPU node of the
cluster how large its GPUs are, without loading anything onto them.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess

from lmbatch.actors.model_files import safetensors_headers, weight_names

GPU_USABLE = 0.9  # of a GPU's memory; the rest: CUDA contexts and fragmentation
# Bytes per weight of a quantised Linear: LLM.int8 keeps one byte and an fp32 scale
# per row; NF4 half a byte plus its absmax per 64 weights (one byte, double quantised).
QUANTISED_BYTES = {"int8": 1.0, "nf4": 0.5 + 1 / 64}
FLOAT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# Tensors bitsandbytes leaves in the compute dtype besides 1-D ones: embeddings, and
# the modules load_model skips (loading.SKIP_QUANTIZE).
NOT_QUANTISED = re.compile(r"embed|wte|wpe|lm_head|classifier|score|pooler")


def footprint_precision(artifact: str | None, precision: str, device: str) -> str:
    """The precision the weights will be held in on ``device``: an artifact's own
    (``artifact``), or the one asked for; auto is bf16 or fp16 on a GPU (two bytes a
    weight either way) and fp32 on CPU, where cpu-int8 loads in fp32 before
    quantising."""
    if artifact not in (None, "fp32", "mixed"):
        return artifact
    if device == "cpu" and precision in ("auto", "cpu-int8"):
        return "fp32"
    return "fp16" if precision == "auto" else precision


def model_bytes(path: str, precision: str, device: str = "cuda") -> int:
    """Bytes the weights of ``path`` take once loaded at ``precision`` on ``device``.

    ``precision`` must be concrete (not ``auto``); bitsandbytes computes in fp16 on a
    GPU and fp32 on CPU, which is what its unquantised tensors are held in.
    """
    compute = "fp32" if device == "cpu" else "fp16"
    dense = FLOAT_BYTES.get(precision, FLOAT_BYTES[compute])
    total = 0.0
    for name, shape, integer_bytes in _tensors(path):
        count = math.prod(shape)
        if integer_bytes:  # ids, int8 layers, codebook indices: kept as stored
            total += count * integer_bytes
        elif precision in QUANTISED_BYTES and _quantised(name, shape):
            total += count * QUANTISED_BYTES[precision]
        else:
            total += count * dense
    return int(total)


def gpu_total_bytes() -> int:
    """The memory of the smallest GPU on this node (run as a Ray task with a GPU); 0
    where Ray gave a GPU but there is no CUDA (a fake GPU node, a broken driver).

    nvidia-smi reads it from the driver; asking torch instead would import torch and
    start CUDA in this worker while the pool waits to be planned, and leave a context
    holding GPU memory for as long as the worker lives. torch answers where nvidia-smi
    cannot.
    """
    listed = _nvidia_smi_total()
    if listed is not None:
        return listed
    import torch

    return int(torch.cuda.mem_get_info()[1]) if torch.cuda.is_available() else 0


def _nvidia_smi_total() -> int | None:
    smi = shutil.which("nvidia-smi")
    if smi is None or "MIG" in os.environ.get("CUDA_VISIBLE_DEVICES", ""):
        return None  # on a MIG slice nvidia-smi gives the whole GPU; torch, the slice
    query = [smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"]
    try:
        listed = subprocess.run(query, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return smallest_mib(listed.stdout) if listed.returncode == 0 else None


def smallest_mib(listing: str) -> int | None:
    """Bytes of the smallest of nvidia-smi's ``memory.total`` lines (MiB, no units);
    None where a line is not a number ("[N/A]")."""
    try:
        sizes = [int(line) for line in listing.split()]
    except ValueError:
        return None
    return min(sizes) * 2**20 if sizes else None


def _tensors(path: str):
    """(name, shape, bytes per element if integer else 0) of every stored tensor of
    the top-level safetensors files (a weights-free copy's record of them too)."""
    files = [
        f for f in weight_names(path) if "/" not in f and f.endswith(".safetensors")
    ]
    for header in safetensors_headers(path, files):
        for name, tensor in header.items():
            yield name, tensor["shape"], _integer_bytes(tensor["dtype"])


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
