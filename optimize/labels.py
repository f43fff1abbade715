"""How far a classifier's outputs moved, as its scores are read.

A classifier's logits become scores through the function transformers' pipeline
picks (``model_info.classify_function``): softmax over labels, a sigmoid for each
label on its own (multi-label models; one-output rerankers), or none (regression).
Fidelity and distillation compare outputs through that same function. A softmax
over a reranker's single logit is always 1, so a divergence taken that way is 0
whatever a step did, and distillation would learn nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def divergence(out: torch.Tensor, ref: torch.Tensor, function: str) -> torch.Tensor:
    """Per row, KL(ref || out) of the scores: of the softmax distributions, or of
    each label's Bernoulli, summed over labels (sigmoid). Logits in, [rows] out."""
    if function == "sigmoid":
        p = torch.sigmoid(ref)
        kl = p * (F.logsigmoid(ref) - F.logsigmoid(out)) + (1 - p) * (
            F.logsigmoid(-ref) - F.logsigmoid(-out)
        )
        return kl.sum(-1)
    log_ref, log_out = F.log_softmax(ref, -1), F.log_softmax(out, -1)
    return F.kl_div(log_out, log_ref, log_target=True, reduction="none").sum(-1)


def label_fidelity(ref: torch.Tensor, out: torch.Tensor, function: str) -> dict:
    """A classifier's fidelity over the evaluation rows' logits ([rows, labels]):
    KL and the share of decisions kept (the top label; each label's side of 0.5),
    or for regression the mean absolute change; for a single output (a reranker's
    score), also the Spearman correlation of the rows' ranking."""
    if function == "none":
        metrics = {"mean_abs_diff": float((ref - out).abs().mean())}
    else:
        metrics = {"kl": float(divergence(out, ref, function).mean())}
        if function == "softmax":
            kept = ref.argmax(-1) == out.argmax(-1)
        else:
            kept = (ref > 0) == (out > 0)
        metrics["agreement"] = float(kept.float().mean())
    if ref.shape[-1] == 1 and len(ref) > 1:
        metrics["spearman"] = spearman(ref[:, 0], out[:, 0])
    return metrics


def label_metrics(function: str, outputs: int) -> list[str]:
    """The metrics ``label_fidelity`` gives a floor to hold, for a classifier with
    ``function`` and ``outputs`` outputs."""
    agreement = [] if function == "none" else ["agreement"]
    return agreement + (["spearman"] if outputs == 1 else [])


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation (ties broken by order: scores are floats)."""
    ranks = [x.argsort().argsort().double() for x in (a, b)]
    ra, rb = (r - r.mean() for r in ranks)
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))
