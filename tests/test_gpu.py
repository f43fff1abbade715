"""Whole jobs on CUDA: every task at every precision, GPU shares, probes, artifacts.

Skipped without CUDA; run them where a GPU is lent (`pytest -m gpu`, see
../shared/gpu/README.md). The host-side logic they rely on is tested on CPU in
test_host_side.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import actor_rows, run_job

from lmbatch.actors.batching import THROUGHPUT_CEILING, probe_budget
from lmbatch.actors.loading import load_model
from lmbatch.actors.memory import CudaMemory, activation_floor, share_limit
from lmbatch.actors.model_info import ModelSpec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
PRECISIONS = ["auto", "fp32", "fp16", "bf16", "int8", "nf4"]
TASK_MODELS = {
    "embed": "bert64",
    "score": "llama",
    "classify": "bert_cls",
    "generate": "gpt2",
}
# How close each precision's values stay to fp32 on CPU: embed and classify compare
# vectors (cosine), score compares log-probabilities (relative).
TOLERANCE = {"fp32": 1e-4, "auto": 2e-2, "fp16": 1e-2, "bf16": 2e-2, "int8": 0.1}


def task_flags(tiny_models, corpus, task: str) -> dict:
    """The job of ``task`` over the test corpus, on its tiny model."""
    model = tiny_models[TASK_MODELS[task]]
    return dict(model=model, inputs=corpus["parquet"], task=task, id_column="doc")


def job(tmp_path, tiny_models, corpus, task: str, precision: str, **flags):
    """``task``'s job on CUDA, 2 actors sharing the GPU."""
    return run_job(tmp_path / f"{task}-{precision}",
                   **task_flags(tiny_models, corpus, task), precision=precision,
                   device="cuda", actors_per_gpu=2, **flags)  # fmt: skip


def cpu_reference(tmp_path, tiny_models, corpus, task: str, **flags) -> dict:
    """The rows of ``task``'s job in fp32 on CPU, computed in this process by the
    actor's own code (``helpers.actor_rows``; test_host_side checks it gives a CPU
    job's rows)."""
    return actor_rows(tmp_path / f"{task}-cpu", **task_flags(tiny_models, corpus, task),
                      precision="fp32", device="cpu", **flags)  # fmt: skip


@pytest.fixture(scope="module")
def cpu_rows(tiny_models, corpus, tmp_path_factory):
    """cpu_rows(task): the fp32 CPU rows, computed once per task for all precisions."""
    done: dict[str, dict] = {}

    def rows(task: str) -> dict:
        if task not in done:
            out = tmp_path_factory.mktemp(f"cpu-{task}")
            done[task] = cpu_reference(out, tiny_models, corpus, task)
        return done[task]

    return rows


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("task", list(TASK_MODELS))
def test_every_task_and_precision_runs_on_cuda(
    task, precision, tiny_models, corpus, cpu_rows, tmp_path
):
    rows, summary = job(tmp_path, tiny_models, corpus, task, precision)
    assert summary.rows == len(rows) == 120 and summary.errors == {}
    expected = "bf16" if precision == "auto" else precision
    if precision == "auto" and torch.cuda.get_device_capability()[0] < 8:
        expected = "fp16"
    assert [r.split(" in ")[1] for r in summary.ran] == [expected]
    assert all(r.startswith("cuda (") for r in summary.ran), summary.ran
    if precision == "nf4" or task == "generate":
        return  # 4-bit drifts too far on 32-wide layers; greedy text may differ
    assert_close(task, rows, cpu_rows(task), TOLERANCE[precision])


def assert_close(task: str, got: dict, want: dict, tolerance: float) -> None:
    if task == "score":
        a = np.array([got[k]["logprob"] for k in want])
        b = np.array([want[k]["logprob"] for k in want])
        np.testing.assert_allclose(a, b, rtol=tolerance)
        return
    column = "embedding" if task == "embed" else "probs"
    a = np.array([got[k][column] for k in want])
    b = np.array([want[k][column] for k in want])
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() >= 1 - tolerance, cosine.min()


@pytest.mark.usefixtures("ray_local")
def test_actors_share_a_gpu_and_each_sizes_to_its_share(tiny_models, corpus, tmp_path):
    _, summary = job(tmp_path, tiny_models, corpus, "embed", "fp16", batch_rows=16)
    assert summary.pool.startswith("2 GPU actors, 2 per GPU, on 1 GPUs"), summary.pool
    # Ray Data asks for the whole pool at once but hands batches to the first actor
    # ready: 120 rows can be done before the second has imported torch.
    assert summary.actors
    total = torch.cuda.mem_get_info()[1]
    for actor in summary.actors:
        assert actor["memory_limit_bytes"] == share_limit(total, 0.5)


def artifact_job(step: dict, tiny_models, corpus, tmp_path):
    """``step`` as a recipe of its own on bert64, then an embed job on CUDA of the
    artifact it writes."""
    from lmbatch.optimize.pipeline import Texts, run_recipe
    from lmbatch.optimize.recipe import to_steps

    texts = Texts(corpus["texts"][:80], corpus["texts"][80:], 32)
    out = tmp_path / "artifact"
    run_recipe(ModelSpec(tiny_models["bert64"], "embed"), to_steps([step]), out, texts)
    return run_job(
        tmp_path / "out",
        model=str(out),
        inputs=corpus["parquet"],
        task="embed",
        id_column="doc",
        device="cuda",
    )


@pytest.mark.usefixtures("ray_local")
def test_a_lowrank_artifact_runs_on_cuda(tiny_models, corpus, tmp_path):
    step = {"lowrank": {"rank_ratio": 0.5, "min_saving": 0.0}}
    rows, summary = artifact_job(step, tiny_models, corpus, tmp_path)
    assert len(rows) == 120 and summary.errors == {}
    assert summary.ran[0].startswith("cuda (")


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_a_bitsandbytes_artifact_runs_on_cuda_as_quantising_at_load(
    method, tiny_models, corpus, tmp_path
):
    """Its weights were quantised on CPU (optimize/artifact.py); on CUDA they load
    as stored, computing in fp16, and give what quantising the original there
    gives."""
    step = {"quantize": {"method": method}}
    got, summary = artifact_job(step, tiny_models, corpus, tmp_path)
    assert summary.errors == {} and len(summary.ran) == 1, summary.ran
    assert summary.ran[0].startswith("cuda (") and summary.ran[0].endswith(
        f" in {method}"
    ), summary.ran
    want, _ = job(tmp_path, tiny_models, corpus, "embed", method)
    assert_close("embed", got, want, 1e-3)


# Each kind of optimize step, as a recipe of its own; ``student``'s directory is made
# by the test (``student_dir``).
OPTIMIZE_STEPS = {
    "magnitude": {"prune": {"method": "magnitude", "pattern": "2:4",
                            "storage": "bitmask"}},
    "activation": {"prune": {"method": "activation", "scope": "global", "rounds": 2,
                             "finetune_steps": 2}},
    "structured": {"prune": {"method": "structured", "heads": 0.5, "ffn": 0.5}},
    "lowrank": {"lowrank": {"energy": 0.9, "min_saving": 0.0}},
    "share": {"share": {"clusters": 16, "iterations": 3}},
    "distill": {"distill": {"layers": 1, "steps": 2}},
    "student": {"distill": {"steps": 2}},
    "fp16": {"quantize": {"method": "fp16"}},
    "search": {"search": {"floor": {"cosine": 0.9},
                          "choices": ["keep", "bf16", "lowrank"], "rows": 16}},
}  # fmt: skip


def student_dir(tiny_models, root) -> str:
    """bert64 cut to its first block: a student sharing its tokenizer and width."""
    import shutil

    from transformers import BertModel

    model = BertModel.from_pretrained(tiny_models["bert64"])
    model.encoder.layer = model.encoder.layer[:1]
    model.config.num_hidden_layers = 1
    model.save_pretrained(root / "student")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tiny_models['bert64']}/{name}", root / "student" / name)
    return str(root / "student")


@pytest.mark.parametrize("name", OPTIMIZE_STEPS)
def test_every_optimize_step_runs_on_cuda(name, tiny_models, corpus, tmp_path):
    """An optimize job holds the model, the teacher and the batches on the GPU where
    it has one: every tensor a step makes must be there too (a CPU tensor beside them
    fails the step), and every snapshot is measured by the infer job's Predictor."""
    from lmbatch.optimize.pipeline import Texts, run_recipe
    from lmbatch.optimize.recipe import to_steps

    step = OPTIMIZE_STEPS[name]
    if name == "student":
        step = {
            "distill": {
                **step["distill"],
                "student": student_dir(tiny_models, tmp_path),
            }
        }
    texts = Texts(corpus["texts"][:80], corpus["texts"][80:], 32)
    spec = ModelSpec(tiny_models["bert64"], "embed")
    results = run_recipe(spec, to_steps([step]), tmp_path / "artifact", texts)
    metrics = results[-1]["metrics"]
    assert np.isfinite(metrics["cosine"]) and metrics["rows_per_s"] > 0, results


def test_gpu_size_from_nvidia_smi_is_what_cuda_says():
    from lmbatch.actors.footprint import gpu_total_bytes

    assert gpu_total_bytes() == pytest.approx(torch.cuda.mem_get_info()[1], rel=0.02)


def test_cuda_probe_budget_is_positive_and_bounded(tiny_models):
    model = load_model(ModelSpec(tiny_models["bert64"], "embed", "fp16"), "cuda")

    def run_probe(rows: int, length: int) -> None:
        ids = torch.zeros((rows, length), dtype=torch.long, device="cuda")
        with torch.inference_mode():
            model(input_ids=ids)

    budget = probe_budget(
        CudaMemory(torch.device("cuda"), share=0.5),
        run_probe,
        "cuda",
        activation_floor(64, 2),
        64,
    )
    assert 64 <= budget.tokens <= THROUGHPUT_CEILING["cuda"]


@pytest.mark.usefixtures("ray_local")
def test_serve_replicas_reserve_a_gpu_share(tiny_models):
    from lmbatch.jobs.serve import prepare_serve, replica_resources
    from lmbatch.jobs.spec import ServeSpec

    spec = ServeSpec(model=tiny_models["bert64"], task="embed", replicas=2)
    device, options = replica_resources(prepare_serve(spec))
    assert device == "cuda" and 0 < options["num_gpus"] <= 0.5


@pytest.mark.usefixtures("ray_local")
def test_serve_answers_on_cuda_as_the_cpu_job_does(tiny_models, corpus, cpu_rows):
    from ray import serve
    from ray_head import free_port
    from test_serve import post

    from lmbatch.jobs.serve import deploy, prepare_serve
    from lmbatch.jobs.spec import ServeSpec

    spec = ServeSpec(model=tiny_models["bert64"], task="embed", device="cuda",
                     precision="fp32", port=free_port())  # fmt: skip
    url = deploy(prepare_serve(spec), threads=1)
    try:
        status, body = post(url, {"inputs": corpus["texts"][:4]})
    finally:
        serve.shutdown()
    assert status == 200, body
    expected = cpu_rows("embed")
    for i, got in enumerate(body["results"]):
        assert got["error"] is None
        want = np.asarray(expected[f"doc-{i:03d}"]["embedding"])
        cosine = np.dot(got["embedding"], want) / np.linalg.norm(want)
        assert cosine == pytest.approx(1.0, abs=TOLERANCE["fp32"])


@pytest.mark.parametrize("signed", [False, True])
def test_signs_pack_on_cuda_as_on_cpu(signed):
    """--embedding-precision binary/ubinary packs on the device."""
    from lmbatch.actors.tasks import pack_signs

    x = torch.randn(64, 13)
    on_gpu = pack_signs(x.cuda(), signed)
    assert on_gpu.is_cuda
    assert torch.equal(on_gpu.cpu(), pack_signs(x, signed))


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("task", ["embed", "score"])
def test_chunked_rows_run_on_cuda_as_on_cpu(
    tiny_models, corpus, tmp_path, task, precision
):
    """--on-long chunk: the windows' values leave the device, each row's are made
    from them on the host; the same rows as on CPU."""
    flags = dict(max_length=8, on_long="chunk")
    cpu = cpu_reference(tmp_path, tiny_models, corpus, task, **flags)
    got, summary = job(tmp_path, tiny_models, corpus, task, precision, **flags)
    assert summary.chunked > 0 and summary.errors == {}
    assert_close(task, got, cpu, TOLERANCE[precision])
