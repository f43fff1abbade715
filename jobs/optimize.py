"""The optimization driver: a recipe run as one Ray task, locally or on a cluster.

    --model, --recipe, --calibration/--eval (checked and read here, on the driver)
        --ray.remote(num_gpus=1 where there is one)--> optimize.pipeline.run_recipe
        --> OUTPUT/ artifact + lmbatch.json + report.md + tradeoff.png

Usage: ``run_optimize(prepare_optimize(spec))``; the CLI does both
(``lmbatch optimize``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import ray

from lmbatch.actors.model_info import CAUSAL_SUFFIXES, inspect_model
from lmbatch.errors import UserError
from lmbatch.jobs.inputs import resolve_inputs
from lmbatch.jobs.session import ray_session
from lmbatch.jobs.spec import OPTIMIZE_TASKS, OptimizeSpec, check_output
from lmbatch.optimize.pipeline import Texts, run_recipe
from lmbatch.optimize.recipe import Distill, Prune, Quantize, Search, Step, load_recipe

EVAL_SHARE = 0.1  # of the calibration text held out when no --eval is given
MIN_EVAL_ROWS = 16


@dataclass(frozen=True)
class OptimizePlan:
    spec: OptimizeSpec
    task: str
    steps: list[Step]
    texts: Texts


def prepare_optimize(spec: OptimizeSpec) -> OptimizePlan:
    """Check model, recipe, text and output; nothing is started or written."""
    steps = load_recipe(spec.recipe)
    task = spec.task or _task_of(spec.model)
    if task not in OPTIMIZE_TASKS:
        raise UserError(
            "--task", f"optimize measures embed, score or classify, not {task}"
        )
    inspect_model(spec.model, task)
    texts = _texts(spec, steps)
    fs, path = check_output(spec.output, spec.overwrite)
    if type(fs).__name__ != "LocalFileSystem":
        raise UserError(
            "--output", "optimize writes a local (or shared-mount) directory"
        )
    return OptimizePlan(spec, task, steps, texts)


def run_optimize(plan: OptimizePlan, address: str | None = None) -> list[dict]:
    """Run the recipe as a Ray task with a GPU where the cluster has one."""
    output = Path(plan.spec.output).resolve()  # replaced only when the job succeeds
    with ray_session(address):
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        cpus = max(
            1, int(max(n["Resources"].get("CPU", 1) for n in ray.nodes() if n["Alive"]))
        )
        task = ray.remote(num_gpus=gpus, num_cpus=cpus, max_retries=0)(_run)
        return ray.get(task.remote(plan, str(output), cpus))


def _run(plan: OptimizePlan, output: str, threads: int) -> list[dict]:
    import torch

    torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS to 1 in workers
    return run_recipe(plan.spec.model, plan.task, plan.steps, Path(output), plan.texts)


def _task_of(model: str) -> str:
    """The task an architecture implies: causal LM -> score, classifier -> classify."""
    arch = inspect_model(model, "embed").architectures  # or a clear error
    if any(a.endswith(CAUSAL_SUFFIXES) for a in arch):
        return "score"
    if any(a.endswith("ForSequenceClassification") for a in arch):
        return "classify"
    return "embed"


def _texts(spec: OptimizeSpec, steps: list[Step]) -> Texts:
    if not spec.calibration and not spec.eval:
        raise UserError(
            "--calibration",
            "give text to measure the steps on (--calibration, and optionally --eval)",
        )
    needs = _needs_calibration(steps)
    if needs and not spec.calibration:
        raise UserError("--calibration", f"{needs} trains or calibrates on text")
    calibration = (
        _read(spec.calibration, spec.text_column, spec.max_rows, "--calibration")
        if spec.calibration
        else []
    )
    if spec.eval:
        evaluation = _read(spec.eval, spec.text_column, spec.eval_rows, "--eval")
    else:
        held = max(
            MIN_EVAL_ROWS, min(spec.eval_rows, int(len(calibration) * EVAL_SHARE))
        )
        if len(calibration) < 2 * held:
            raise UserError(
                "--calibration",
                f"{len(calibration)} rows of text are "
                f"too few to hold {held} out; give more or pass --eval",
            )
        calibration, evaluation = calibration[:-held], calibration[-held:]
    if len(evaluation) < MIN_EVAL_ROWS:
        raise UserError("--eval", f"{len(evaluation)} rows; need {MIN_EVAL_ROWS}")
    return Texts(calibration, evaluation, spec.max_length)


def _needs_calibration(steps: list[Step]) -> str | None:
    for i, step in enumerate(steps):
        if (
            isinstance(step, Distill | Search)
            or (
                isinstance(step, Prune)
                and (step.method != "magnitude" or step.finetune_steps)
            )
            or (
                isinstance(step, Quantize)
                and (step.qat or step.activations == "static")
            )
        ):
            return f"steps[{i}]"
    return None


def _read(given: tuple[str, ...], column: str, limit: int, flag: str) -> list[str]:
    """Up to ``limit`` non-empty strings of ``column``, files in order."""
    try:
        inputs = resolve_inputs(list(given), None, column, None)
    except UserError as e:  # --input is what resolve_inputs calls it; name ours
        raise UserError(flag if e.where == "--input" else e.where, e.message) from None
    texts: list[str] = []
    for path in inputs.paths:
        try:
            with inputs.filesystem.open_input_file(path) as f:
                table = {
                    "parquet": lambda: pq.read_table(f, columns=[column]),
                    "csv": lambda: pacsv.read_csv(f),
                    "jsonl": lambda: pajson.read_json(f),
                }[inputs.format]()
        except pa.ArrowInvalid as e:
            raise UserError(
                flag, f"cannot read {path}: {str(e).splitlines()[0]}"
            ) from None
        values = table[column]
        if not pa.types.is_string(values.type) and not pa.types.is_large_string(
            values.type
        ):
            raise UserError(flag, f"column {column!r} of {path} is not text")
        texts += [t for t in values.to_pylist() if t and t.strip()]
        if len(texts) >= limit:
            break
    if not texts:
        raise UserError(flag, f"no text in column {column!r}")
    return texts[:limit]
