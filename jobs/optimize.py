"""The optimization driver: a recipe run as one Ray task, locally or on a cluster.

    --model, --recipe, --calibration/--eval (checked and read here, on the driver)
        --ray.remote(num_gpus=1 where there is one)--> optimize.pipeline.run_recipe
        --> OUTPUT/ artifact + lmbatch.json + report.md + tradeoff.png

Usage: ``run_optimize(prepare_optimize(spec))``; the CLI does both
(``lmbatch optimize``).
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import ray

from lmbatch.actors.artifact import ArtifactMeta, stored_precision
from lmbatch.actors.model_files import fetch_model
from lmbatch.actors.model_info import (
    CAUSAL_SUFFIXES,
    ModelInfo,
    ModelSpec,
    check_weights,
    inspect_model,
)
from lmbatch.actors.storage import filesystem_of, is_local
from lmbatch.errors import UserError
from lmbatch.jobs.calibration import read_texts
from lmbatch.jobs.cluster import gpu_view
from lmbatch.jobs.gpus import choose_device
from lmbatch.jobs.lease import check_no_writer, writer_lease
from lmbatch.jobs.output import OPTIMIZE_MARKERS, check_output, create_output
from lmbatch.jobs.session import ray_session
from lmbatch.jobs.spec import OPTIMIZE_TASKS, OptimizeSpec, paired_with_itself
from lmbatch.optimize.labels import label_metrics
from lmbatch.optimize.pipeline import Texts, run_recipe, snapshots_dir
from lmbatch.optimize.recipe import (
    BITSANDBYTES,
    Distill,
    Prune,
    Quantize,
    Search,
    Step,
    load_recipe,
)

EVAL_SHARE = 0.1  # of the calibration text held out when no --eval is given
MIN_EVAL_ROWS = 16


@dataclass(frozen=True)
class OptimizePlan:
    spec: OptimizeSpec
    task: str
    steps: list[Step]
    texts: Texts
    info: ModelInfo


def prepare_optimize(spec: OptimizeSpec) -> OptimizePlan:
    """Check model, recipe, text and output; nothing is started or written."""
    steps = load_recipe(spec.recipe)
    model_dir = fetch_model(spec.model, weights=False)  # the task fetches the rest
    task = spec.task or _task_of(model_dir, spec)
    if task not in OPTIMIZE_TASKS:
        raise UserError(
            "--task", f"optimize measures embed, score or classify, not {task}"
        )
    if spec.pair_column is not None and task != "classify":
        raise UserError(
            "--pair-column",
            f"optimize reads text pairs for --task classify (a cross-encoder's, an "
            f"NLI model's), not {task}",
        )
    if why := paired_with_itself(spec.text_column, spec.pair_column):
        raise UserError("--pair-column", why)
    info = inspect_model(model_dir, task, spec.trust_remote_code, spec.allow_pickle)
    if info.precision in BITSANDBYTES:
        raise UserError("--model", _untrainable(spec.model, info.precision))
    _check_students(steps, spec.allow_pickle)
    _check_losses(steps, task, info)
    _check_floors(steps, task, info)
    _check_lengths(spec, steps, info.max_positions)
    texts = _texts(spec, steps)
    fs, path = check_output(spec.output, spec.model, OPTIMIZE_MARKERS, spec.overwrite)
    folder, lease = _lease(path)
    check_no_writer(fs, folder, spec.output, lease)
    return OptimizePlan(spec, task, steps, texts, info)


def run_optimize(plan: OptimizePlan, address: str | None = None) -> list[dict]:
    """Run the recipe as one Ray task, with a GPU where the cluster has or can get
    one (``--device``); the task writes the artifact to ``--output`` itself."""
    fs, path = filesystem_of(plan.spec.output, "--output")
    folder, lease = _lease(path)
    if is_local(fs):
        create_output(fs, folder, plan.spec.output)
    try:
        with writer_lease(fs, folder, lease), ray_session(address):
            gpus, cpus = _resources(plan)
            task = ray.remote(num_gpus=gpus, num_cpus=cpus, max_retries=0)(_run)
            return ray.get(task.remote(plan, cpus))
    except BaseException:  # Ctrl-C, a lost node: the task died with Ray, mid-step
        if is_local(fs):
            shutil.rmtree(snapshots_dir(Path(path)), ignore_errors=True)
        raise


def _lease(path: str) -> tuple[str, str]:
    """(folder, name) of the lease of an optimize job writing ``path``: beside it, as
    its step snapshots are, since the output appears only once the artifact is
    whole."""
    folder, _, name = path.rstrip("/").rpartition("/")
    return folder or "/", f".{name}.writer.json"


def _resources(plan: OptimizePlan) -> tuple[int, int]:
    """(GPUs, CPUs) of the recipe's task: a GPU and its share of its node's CPUs,
    or the CPUs of the largest node."""
    view = gpu_view()
    if choose_device(plan.spec.device, "fp32", plan.info, view) == "cuda":
        return 1, max(1, int(view.cpus_per_gpu))
    nodes = [n["Resources"].get("CPU", 1) for n in ray.nodes() if n["Alive"]]
    return 0, max(1, int(max(nodes)))


def _run(plan: OptimizePlan, threads: int) -> list[dict]:
    """On the node the task got: the model from there, the artifact written locally
    and, for a URI, copied to it (replacing what --overwrite allowed to replace)."""
    import torch

    torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS to 1 in workers
    show_progress()
    spec = plan.spec
    base = ModelSpec(
        fetch_model(spec.model),
        plan.task,
        trust_remote_code=spec.trust_remote_code,
        allow_pickle=spec.allow_pickle,
    )
    fs, path = filesystem_of(spec.output, "--output")
    if is_local(fs):
        return run_recipe(base, plan.steps, Path(path), plan.texts)
    with tempfile.TemporaryDirectory(prefix="lmbatch-artifact-") as tmp:
        local = Path(tmp) / "artifact"
        results = run_recipe(base, plan.steps, local, plan.texts)
        fs.delete_dir_contents(path, missing_dir_ok=True)
        pafs.copy_files(str(local), path, destination_filesystem=fs)
    return results


def show_progress() -> None:
    """The recipe's own lines (each step as it starts, training every 15 s, each
    measurement) on this process's stdout, which Ray forwards to the driver's
    console: a recipe can run for hours, and a worker logs nothing below WARNING."""
    logger = logging.getLogger("lmbatch")
    logger.setLevel(logging.INFO)
    if not any(getattr(h, "lmbatch_progress", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.lmbatch_progress = True
        logger.addHandler(handler)


def _task_of(model: str, spec: OptimizeSpec) -> str:
    """The task an architecture implies: causal LM -> score, classifier -> classify."""
    info = inspect_model(model, "embed", spec.trust_remote_code, spec.allow_pickle)
    arch = info.architectures
    if any(a.endswith(CAUSAL_SUFFIXES) for a in arch):
        return "score"
    if any(a.endswith("ForSequenceClassification") for a in arch):
        return "classify"
    return "embed"


def _check_students(steps: list[Step], allow_pickle: bool) -> None:
    """A distill step's student has weights the recipe's task may load and train."""
    for i, step in enumerate(steps):
        if isinstance(step, Distill) and step.student:
            where = f"steps[{i}].distill.student"
            try:
                check_weights(Path(step.student), allow_pickle)
                meta = ArtifactMeta.read(step.student)
                own = meta.precision if meta else stored_precision(step.student, "auto")
            except UserError as e:  # it names --model; the student is the recipe's
                raise UserError(where, e.message) from None
            if own in BITSANDBYTES:
                raise UserError(where, _untrainable(step.student, own))


def _check_losses(steps: list[Step], task: str, info: ModelInfo) -> None:
    """A distill field this task's loss would ignore, refused before the model loads."""
    scores = info.classify_function if task == "classify" else "softmax"
    for i, step in enumerate(steps):
        if isinstance(step, Distill) and (ignored := step.ignored_by(task, scores)):
            name, why = ignored
            raise UserError(f"steps[{i}].distill.{name}", why)


def _untrainable(model: str, precision: str) -> str:
    """bitsandbytes' int8 and nf4 tensors take no gradient, and a recipe's steps
    change weights."""
    return (
        f"{model} holds its weights in {precision} (bitsandbytes); a recipe starts "
        "from full-precision weights: give the model it was made of"
    )


def _check_lengths(
    spec: OptimizeSpec, steps: list[Step], positions: int | None
) -> None:
    """A row length given longer than the model's positions, which would fail on
    the first long text (its position ids past the embedding table). Defaults are
    cut to fit instead (``make_batches``)."""
    given = {"--max-length": spec} | {
        f"steps[{i}].distill.max_length": step
        for i, step in enumerate(steps)
        if isinstance(step, Distill)
    }
    for where, model in given.items():
        length = model.max_length if "max_length" in model.model_fields_set else 0
        if positions and length > positions:
            raise UserError(
                where, f"{length} is more than the model's {positions} positions"
            )


def _check_floors(steps: list[Step], task: str, info: ModelInfo) -> None:
    """A search step's floor names metrics this task and model are measured by."""
    measured = measured_metrics(task, info)
    for i, step in enumerate(steps):
        for metric in step.floor if isinstance(step, Search) else ():
            if metric not in measured:
                raise UserError(
                    f"steps[{i}].search.floor.{metric}",
                    f"not measured for this model (--task {task}): "
                    f"{', '.join(measured)}",
                )


def measured_metrics(task: str, info: ModelInfo) -> list[str]:
    """The floor metrics a step of ``task`` is measured by (optimize/evaluate.py,
    optimize/labels.py): a classifier's depend on its score function and outputs."""
    if task == "embed":
        return ["cosine", "top10"]
    if task == "score":
        return ["perplexity_increase"]
    return label_metrics(info.classify_function, len(info.id2label))


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
        read_texts(
            spec.calibration,
            spec.text_column,
            spec.max_rows,
            "--calibration",
            spec.output,
            spec.pair_column,
            spec.input_encoding,
        )
        if spec.calibration
        else []
    )
    if spec.eval:
        evaluation = read_texts(
            spec.eval,
            spec.text_column,
            spec.eval_rows,
            "--eval",
            spec.output,
            spec.pair_column,
            spec.input_encoding,
        )
    else:
        held = max(
            MIN_EVAL_ROWS, min(spec.eval_rows, int(len(calibration) * EVAL_SHARE))
        )
        if len(calibration) < 2 * held:
            raise UserError(
                "--calibration",
                f"{len(calibration)} {'row' if len(calibration) == 1 else 'rows'} "
                f"of text: too few to hold {held} out for evaluation and calibrate "
                f"on the rest; give at least {2 * held}, or pass --eval",
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
