"""Measure what one loaded model costs on the device its actors will use.

Runs as a Ray task with the actor's own resources, so that a GPU cluster driven from a
CPU head still measures on a GPU. The pool's GPU fraction comes from this number.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actors.loading import ModelSpec, load_model


@dataclass(frozen=True)
class Footprint:
    model_bytes: int  # weights and buffers as loaded (quantised where asked)
    device_total_bytes: int  # the GPU's memory; 0 on CPU


def measure_footprint(spec: ModelSpec) -> Footprint:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(spec, device)
    total = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else 0
    return Footprint(int(model.get_memory_footprint()), int(total))
