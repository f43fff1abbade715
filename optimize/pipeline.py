"""Run a recipe: apply each step in order, save and reload it, measure it.

    original --step 1--> snapshot --load_model--> fidelity, size, rows/s
             --step 2--> ...                       (one row per step)
    last snapshot -> OUTPUT (artifact) + lmbatch.json + report.md + tradeoff.png

What is measured is what reloads: each snapshot goes through the one ``load_model`` and
the infer job's ``Predictor`` before its numbers are taken.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from dataclasses import dataclass, replace
from fnmatch import fnmatch
from pathlib import Path

import torch
from transformers import PreTrainedModel

from lmbatch.actors.layers import conv1d_as_linear
from lmbatch.actors.loading import load_model
from lmbatch.actors.model_files import fingerprint
from lmbatch.actors.model_info import ModelSpec, inspect_model
from lmbatch.actors.tokenize import load_tokenizer
from lmbatch.errors import UserError
from lmbatch.optimize.artifact import ArtifactMeta, save_artifact
from lmbatch.optimize.calibrate import Row, make_batches, target_linears
from lmbatch.optimize.context import Context, embed_head
from lmbatch.optimize.distill import apply_distill
from lmbatch.optimize.evaluate import fidelity, sizes, throughput
from lmbatch.optimize.lowrank import apply_lowrank
from lmbatch.optimize.prune import apply_prune
from lmbatch.optimize.quantize import apply_quantize
from lmbatch.optimize.recipe import (
    STEP_NAMES,
    Distill,
    Lowrank,
    Prune,
    Quantize,
    Search,
    Share,
    Step,
    to_dicts,
)
from lmbatch.optimize.report import write_report
from lmbatch.optimize.search import apply_search
from lmbatch.optimize.share import apply_share

log = logging.getLogger("lmbatch")
APPLY = {
    Quantize: apply_quantize,
    Prune: apply_prune,
    Distill: apply_distill,
    Lowrank: apply_lowrank,
    Share: apply_share,
    Search: apply_search,
}
CALIBRATION_ROWS = 256  # rows for activation statistics (training uses them all)


@dataclass(frozen=True)
class Texts:
    calibration: list[Row]  # texts, or text pairs (--pair-column)
    evaluation: list[Row]
    max_length: int = 128  # tokens per calibration/evaluation row


def run_recipe(
    spec: ModelSpec, steps: list[Step], output: Path, texts: Texts
) -> list[dict]:
    """Apply ``steps`` to the model of ``spec`` (its path and task, and whether its
    pickles and its own code may load), write the artifact to ``output``. The
    artifact, and each step's snapshot, holds safetensors only."""
    torch.manual_seed(0)
    model_dir, task, base = spec.path, spec.task, Path(spec.path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = load_model(spec, device)
    teacher.requires_grad_(False)
    model = student_of(teacher)
    check_targets(model, steps)
    tokenizer = load_tokenizer(model_dir, spec.trust_remote_code)
    positions = inspect_model(
        model_dir, task, spec.trust_remote_code, spec.allow_pickle
    ).max_positions
    if positions:  # every step's rows fit the model (calibrate.make_batches)
        tokenizer.model_max_length = min(tokenizer.model_max_length, positions)
    ctx = Context(
        teacher=teacher,
        tokenizer=tokenizer,
        embed=embed_head(spec, teacher),
        calibration=texts.calibration,
        batches=make_batches(
            tokenizer,
            texts.calibration[:CALIBRATION_ROWS],
            texts.max_length,
            16,
            device,
        ),
        eval_batches=make_batches(
            tokenizer, texts.evaluation, texts.max_length, 32, device
        ),
        device=device,
        base=spec,
        scores=scores_of(spec),
    )
    results = [measure("original", base, ctx, texts, [])]
    meta = ArtifactMeta(
        base_model=str(base),
        base_fingerprint=fingerprint(model_dir),  # what a resumed infer job checks
        task=task,
        recipe=to_dicts(steps),
    )
    work = snapshots_dir(output)
    snapshot = None
    try:
        for i, step in enumerate(steps):
            name = STEP_NAMES[type(step)]
            ctx.notes = []
            started = time.perf_counter()
            log.info("step %d of %d: %s", i + 1, len(steps), name)
            model = APPLY[type(step)](model, step, ctx, f"steps[{i}].{name}")
            meta.precision = _precision(model, ctx)
            meta.quantization = ctx.quantization
            previous, snapshot = snapshot, work / f"{i}-{name}"
            save_artifact(model, snapshot, spec, meta, ctx.storage)
            if previous is not None:
                shutil.rmtree(previous)
            result = measure(f"{i + 1}. {name}", snapshot, ctx, texts, ctx.notes)
            result["seconds"] = round(time.perf_counter() - started, 1)
            results.append(result)
        meta.steps = results
        if ctx.search:
            meta.recipe[-1]["search"]["result"] = ctx.search
        whole = work / "artifact"  # renamed into place once whole: never half there
        save_artifact(model, whole, spec, meta, ctx.storage)
        write_report(whole, task, results)
        shutil.rmtree(output, ignore_errors=True)
        whole.rename(output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def student_of(teacher: PreTrainedModel) -> PreTrainedModel:
    """The model the steps change: a trainable copy of the original, GPT-2's Conv1D
    layers as the Linears every step changes (``save_artifact`` stores the ones
    left plain as Conv1D again)."""
    return conv1d_as_linear(copy.deepcopy(teacher).requires_grad_(True))


def check_targets(model: torch.nn.Module, steps: list[Step]) -> None:
    """A ``skip`` glob that matches none of the model's layers (a recipe written for
    another model, a typo) is refused before the first step: the step would change
    the layers it was to keep, and the run would take minutes to show it. So is a
    ``skip`` that leaves a step nothing to change: it would report a change it never
    made.

    Raises:
        UserError: naming the step's ``skip``.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for i, step in enumerate(steps):
        where = f"steps[{i}].{STEP_NAMES[type(step)]}.skip"
        skip = getattr(step, "skip", ())
        for glob in skip:
            if not any(fnmatch(name, glob) for name in names):
                raise UserError(
                    where,
                    f"{glob!r} matches no layer of this model (its {len(names)} "
                    f"Linears are named like {names[0]!r} ... {names[-1]!r})",
                )
        if skip and not target_linears(model, skip):
            raise UserError(
                where, "leaves the step no layer to change (the heads are kept anyway)"
            )


def scores_of(spec: ModelSpec) -> str:
    """How the task's logits become scores: a classifier's function, as its infer
    job applies it; a causal LM's token distributions are softmaxes."""
    if spec.task != "classify":
        return "softmax"
    return inspect_model(
        spec.path, spec.task, spec.trust_remote_code, spec.allow_pickle
    ).classify_function


def snapshots_dir(output: Path) -> Path:
    """Where each step's model is saved to be measured, and the artifact until it is
    whole: beside the output (one filesystem, so a rename moves it), and removed
    when the recipe ends."""
    return output.parent / f".{output.name}.steps"


def measure(
    name: str, path: Path, ctx: Context, texts: Texts, notes: list[str]
) -> dict:
    """Reload ``path`` as the infer job would and take its numbers."""
    rows_per_s, predictor = throughput(
        replace(ctx.base, path=str(path)), texts.evaluation, texts.max_length
    )
    metrics = fidelity(predictor.model, ctx, ctx.eval_batches)
    metrics.update(sizes(predictor.model, path, ctx.masks))
    metrics["rows_per_s"] = rows_per_s
    log.info(
        "measured %s: %s", name, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    )
    return {"name": name, "metrics": metrics, "notes": list(notes)}


def _precision(model: torch.nn.Module, ctx: Context) -> str:
    if ctx.quantization:
        return ctx.quantization["method"]
    from lmbatch.actors.layers import CastLinear, Int8Linear

    if any(isinstance(m, CastLinear | Int8Linear) for m in model.modules()):
        return "mixed"
    return ctx.dtype
