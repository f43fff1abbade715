"""GPU paths: CUDA memory probing, bitsandbytes GPU kernels, fractional GPUs.

Skipped without CUDA; run them where a GPU is lent (`pytest -m gpu`).
"""

from __future__ import annotations

import pytest
import torch

from actors.batching import probe_budget
from actors.footprint import measure_footprint
from actors.loading import ModelSpec, load_model
from actors.memory import CudaMemory, activation_floor
from jobs.pool import actors_per_gpu

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8", "nf4"])
def test_quantised_models_run_on_cuda(precision, tiny_models):
    spec = ModelSpec(tiny_models["bert64"], "embed", precision)
    model = load_model(spec, "cuda")
    reference = load_model(ModelSpec(tiny_models["bert64"], "embed"), "cuda")
    ids = torch.randint(6, 90, (4, 16), device="cuda")
    with torch.inference_mode():
        got = model(input_ids=ids).last_hidden_state.float()
        want = reference(input_ids=ids).last_hidden_state
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1).mean()
    assert cosine > 0.95


def test_cuda_probe_budget_is_positive_and_bounded(tiny_models):
    model = load_model(ModelSpec(tiny_models["bert64"], "embed", "fp16"), "cuda")

    def run_probe(rows: int, length: int) -> None:
        ids = torch.zeros((rows, length), dtype=torch.long, device="cuda")
        with torch.inference_mode():
            model(input_ids=ids)

    budget = probe_budget(
        CudaMemory(torch.device("cuda")), run_probe, "cuda", activation_floor(64, 2), 64
    )
    assert 64 <= budget.tokens <= 1 << 20


def test_int8_footprint_packs_more_actors_than_fp16(tiny_models):
    fp16 = measure_footprint(ModelSpec(tiny_models["bert64"], "embed", "fp16"))
    int8 = measure_footprint(ModelSpec(tiny_models["bert64"], "embed", "int8"))
    assert int8.model_bytes < fp16.model_bytes and fp16.device_total_bytes > 0
    assert actors_per_gpu(int8.model_bytes, int8.device_total_bytes) >= actors_per_gpu(
        fp16.model_bytes, fp16.device_total_bytes
    )
