"""What a step cost and bought: fidelity to the original on held-out text, size, speed.

Fidelity by task: embeddings, mean and minimum cosine and top-10 neighbour overlap
(neighbours among the evaluation rows); causal LMs, perplexity, its relative increase,
KL(original || optimized) per token and top-1 agreement; classifiers, label agreement
and KL. Speed is rows/s of the infer job's own ``Predictor`` (adaptive token budget,
length-sorted micro-batches) on the current device, over the evaluation rows.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from lmbatch.actors.model_info import ModelSpec, inspect_model
from lmbatch.actors.predict import PredictorConfig
from lmbatch.actors.predictor import Predictor
from lmbatch.actors.tokenize import TokenizeConfig, actor_batch
from lmbatch.optimize.calibrate import Batch, Row, split
from lmbatch.optimize.context import Context
from lmbatch.optimize.labels import divergence, label_fidelity


@torch.inference_mode()
def fidelity(model: nn.Module, ctx: Context, batches: list[Batch]) -> dict[str, float]:
    """Compare ``model`` with ``ctx.teacher`` on ``batches``."""
    if ctx.task == "embed":
        ref = torch.cat([_embed(ctx.teacher, b, ctx) for b in batches])
        out = torch.cat([_embed(model, b, ctx) for b in batches])
        return embedding_fidelity(ref, out)
    if ctx.task == "classify":
        ref = torch.cat([ctx.teacher(**b).logits.float() for b in batches])
        out = torch.cat([model(**b).logits.float() for b in batches])
        return label_fidelity(ref, out, ctx.scores)
    totals = {"nll_ref": 0.0, "nll": 0.0, "kl": 0.0, "agree": 0.0, "n": 0}
    for batch in batches:
        ref = ctx.teacher(**batch).logits.float()
        out = model(**batch).logits.float()
        _accumulate(totals, ref, out, batch)
    n = max(1, totals["n"])
    ppl_ref, ppl = math.exp(totals["nll_ref"] / n), math.exp(totals["nll"] / n)
    return {
        "kl": totals["kl"] / n,
        "perplexity": ppl,
        "perplexity_increase": ppl / ppl_ref - 1,
        "top1_agreement": totals["agree"] / n,
    }


def embedding_fidelity(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    cos = (F.normalize(ref, dim=-1) * F.normalize(out, dim=-1)).sum(dim=-1)
    return {
        "cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "top10": top_k_overlap(ref, out, 10),
    }


def top_k_overlap(ref: torch.Tensor, out: torch.Tensor, k: int) -> float:
    """Share of each row's k nearest neighbours (by cosine, itself excluded) kept."""
    k = min(k, len(ref) - 1)
    if k < 1:
        return 1.0

    def neighbours(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x.float(), dim=-1)
        sims = x @ x.T
        sims.fill_diagonal_(-2.0)
        return sims.topk(k, dim=1).indices

    a, b = neighbours(ref), neighbours(out)
    hits = (a[:, :, None] == b[:, None, :]).any(dim=2).float()
    return float(hits.mean())


def meets(metrics: dict[str, float], floor: dict[str, float]) -> bool:
    """Is every floor held? perplexity_increase is a ceiling, the rest are floors."""
    for name, bound in floor.items():
        value = metrics.get(name)
        if value is None:
            return False
        if name == "perplexity_increase" and value > bound:
            return False
        if name != "perplexity_increase" and value < bound:
            return False
    return True


def throughput(
    spec: ModelSpec, texts: list[Row], max_length: int, repeats: int = 2
) -> tuple[float, Predictor]:
    """Rows/s of the infer job's Predictor on the model of ``spec`` (a step's
    snapshot): best of ``repeats`` passes, the probe and first call's warm-up
    excluded."""
    info = inspect_model(
        spec.path, spec.task, spec.trust_remote_code, spec.allow_pickle
    )
    max_length = min(max_length, info.max_positions or max_length)
    config = PredictorConfig(
        model=spec,
        info=info,
        device="cuda" if torch.cuda.is_available() else "cpu",
        threads=os.cpu_count() or 1,
        max_length=max_length,
    )
    predictor = Predictor(config)
    batch = _token_batch(spec, texts, max_length)
    predictor(batch)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        predictor(batch)
        best = min(best, time.perf_counter() - started)
    return len(texts) / best, predictor


def sizes(model: nn.Module, path: Path, masks: dict[str, torch.Tensor]) -> dict:
    """Parameters (non-zeros where pruned; a bitsandbytes weight's own count, not
    its packed bytes' nor its scales') and bytes of the weight files."""
    held = dict(model.named_parameters()) | dict(model.named_buffers())
    params = 0
    for key in model.state_dict():
        if key in masks:
            params += int(masks[key].sum())
        elif key in held:  # not bitsandbytes' quantisation state, stored beside
            packed = getattr(held[key], "quant_state", None)  # nf4: two a byte
            params += held[key].numel() if packed is None else packed.shape.numel()
    disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {"parameters": params, "bytes": disk}


def _embed(model: nn.Module, batch: Batch, ctx: Context) -> torch.Tensor:
    hidden = model(**batch).last_hidden_state
    return F.normalize(ctx.embed.embedding(hidden, batch["attention_mask"]), dim=-1)


def _accumulate(
    totals: dict, ref: torch.Tensor, out: torch.Tensor, batch: Batch
) -> None:
    """A causal LM's predictions of each next real token, summed."""
    mask = batch["attention_mask"][:, 1:].reshape(-1).bool()
    target = batch["input_ids"][:, 1:].reshape(-1)[mask]
    ref = ref[:, :-1].reshape(-1, ref.shape[-1])[mask]
    out = out[:, :-1].reshape(-1, out.shape[-1])[mask]
    totals["nll_ref"] += float(F.cross_entropy(ref, target, reduction="sum"))
    totals["nll"] += float(F.cross_entropy(out, target, reduction="sum"))
    totals["kl"] += float(divergence(out, ref, "softmax").sum())
    totals["agree"] += float((ref.argmax(-1) == out.argmax(-1)).sum())
    totals["n"] += len(ref)


def _token_batch(spec: ModelSpec, rows: list[Row], max_length: int) -> pa.Table:
    """The tokenize stage's output for ``rows``, as the actor receives it."""
    config = TokenizeConfig(
        spec.path, max_length, min_tokens=1, trust_remote_code=spec.trust_remote_code
    )
    texts, pairs = split(rows)
    return actor_batch(texts, config, pairs)
