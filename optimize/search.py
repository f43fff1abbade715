"""Search: the per-Linear mix of precisions and factorizations with the highest measured
throughput that still holds a fidelity floor.

1. Time each choice applied to every Linear at once: that orders choices fastest first.
2. Measure each (Linear, choice) alone: the fidelity it costs (sensitivity).
3. Fastest choice first: among the Linears still unassigned, least sensitive first,
   binary-search the longest run that keeps the floor with everything chosen so far,
   and assign it. Repeat with the next choice.
Every trial swaps prebuilt modules in place, so a trial costs one evaluation pass.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from transformers import PreTrainedModel

from lmbatch.actors.layers import CastLinear, Int8Linear, LowRankLinear, replace_module
from lmbatch.optimize.calibrate import target_linears
from lmbatch.optimize.context import Context
from lmbatch.optimize.evaluate import fidelity, meets
from lmbatch.optimize.lowrank import factorize
from lmbatch.optimize.recipe import Lowrank, Search

log = logging.getLogger("lmbatch")


def apply_search(
    model: PreTrainedModel, step: Search, ctx: Context, where: str
) -> PreTrainedModel:
    batches = _rows(ctx.eval_batches, step.rows)
    names = target_linears(model, ())
    # torch's int8 kernels are CPU kernels: on a GPU that choice is not on the menu.
    cpu_only = () if ctx.device == "cpu" else ("cpu-int8",)
    options = [c for c in step.choices if c not in ("keep", *cpu_only)]
    built = {
        (n, c): convert(model.get_submodule(n), c, step) for n in names for c in options
    }
    built.update({(n, "keep"): model.get_submodule(n) for n in names})
    assignment = dict.fromkeys(names, "keep")

    def trial(changes: dict[str, str]) -> dict[str, float]:
        for name, choice in {**assignment, **changes}.items():
            replace_module(model, name, built[(name, choice)])
        return fidelity(model, ctx, batches)

    speed = {
        c: _rows_per_s(model, names, built, c, batches) for c in ("keep", *options)
    }
    for choice in sorted(options, key=speed.get, reverse=True):
        if speed[choice] <= speed["keep"]:
            continue
        free = [n for n in names if assignment[n] == "keep"]
        if not free:  # a faster choice took them all
            break
        log.info("search: %s, each of %d Linears measured alone", choice, len(free))
        cost = {n: _loss(trial({n: choice}), step.floor) for n in free}
        free.sort(key=cost.get)
        k = _longest_run(
            lambda k, c=choice, f=free: meets(
                trial(dict.fromkeys(f[:k], c)), step.floor
            ),
            len(free),
        )
        assignment.update(dict.fromkeys(free[:k], choice))
        log.info("search: %s on %d of %d Linears holds the floor", choice, k, len(free))
    trial({})
    counts = {c: sum(v == c for v in assignment.values()) for c in step.choices}
    ctx.notes.append("search: " + ", ".join(f"{v} {c}" for c, v in counts.items()))
    ctx.search = {"assignment": assignment, "rows_per_s": speed}
    return model


def convert(linear: nn.Linear, choice: str, step: Search) -> nn.Module:
    """``linear`` as ``choice`` would hold it (a new module; the original is kept)."""
    if choice == "bf16":
        return CastLinear.from_linear(linear, "bfloat16")
    if choice == "cpu-int8":
        return Int8Linear.from_linear(linear)
    plan = Lowrank(rank_ratio=step.rank_ratio, min_saving=0.0)
    return LowRankLinear.from_factors(
        linear, *factorize(linear.weight.detach().float(), plan, None)
    )


def _longest_run(ok, n: int) -> int:
    """Largest k in [0, n] with ok(k), assuming ok holds up to some k and then fails."""
    low, high = 0, n
    if ok(n):
        return n
    while low < high - 1:
        mid = (low + high) // 2
        if ok(mid):
            low = mid
        else:
            high = mid
    return low


def _loss(metrics: dict[str, float], floor: dict[str, float]) -> float:
    """How far a trial moved from the original, on the floor's own metrics."""
    return sum(
        metrics[m] if m == "perplexity_increase" else 1 - metrics[m] for m in floor
    )


@torch.inference_mode()
def _rows_per_s(
    model: nn.Module, names: list[str], built: dict, choice: str, batches: list
) -> float:
    for name in names:
        replace_module(model, name, built[(name, choice)])
    model(**batches[0])  # warm-up
    _finish(model)
    started = time.perf_counter()
    for batch in batches:
        model(**batch)
    _finish(model)
    rows = sum(len(b["input_ids"]) for b in batches)
    for name in names:
        replace_module(model, name, built[(name, "keep")])
    return rows / (time.perf_counter() - started)


def _finish(model: nn.Module) -> None:
    """Wait for the work queued on the model's GPU: a timed pass there is otherwise
    only its launches."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rows(batches: list, rows: int) -> list:
    """About ``rows`` rows in batches spread over the length-sorted evaluation set."""
    per_batch = max(1, len(batches[0]["input_ids"]))
    wanted = max(1, min(len(batches), -(-rows // per_batch)))
    step = len(batches) / wanted
    return [batches[int(i * step)] for i in range(wanted)]
