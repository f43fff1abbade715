"""Task heads: what each task computes from one padded micro-batch.

A head runs on the model's device and returns tensors there (``__call__``); the
Predictor brings them to host memory in one place (``actors/transfer.py``) and the head
turns the host arrays into its output columns (``columns``), one entry per row along
the first axis. Each head names its columns as an Arrow schema, so every Parquet file
of a job agrees; vectors are fixed-size lists built from one contiguous array.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmbatch.actors.model_info import Pooling

Tensors = dict[str, torch.Tensor]
Columns = dict[str, np.ndarray]


class TaskHead(Protocol):
    schema: pa.Schema  # output columns besides id and error
    padding_side: str  # "right", or "left" where generation appends tokens

    def __call__(
        self, model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor
    ) -> Tensors: ...

    def columns(self, host: Columns) -> Columns: ...


@dataclass(frozen=True)
class Embed:
    """Pooled sentence embedding, as sentence-transformers computes it."""

    pooling: Pooling
    dim: int  # the embedding's width
    padding_side = "right"

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([("embedding", pa.list_(pa.float32(), self.dim))])

    def __call__(
        self, model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor
    ) -> Tensors:
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        pooled = pool(hidden, mask, self.pooling.mode)
        if self.pooling.normalize:
            pooled = F.normalize(pooled, p=2, dim=1)
        return {"embedding": pooled}

    def columns(self, host: Columns) -> Columns:
        return host


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool right-padded token states into one vector a row."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values
    if mode == "lasttoken":
        return hidden[torch.arange(hidden.shape[0]), mask.sum(dim=1) - 1]
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


@dataclass(frozen=True)
class Score:
    """Log-probability of each text under a causal LM: sum over predicted tokens."""

    schema = pa.schema(
        [
            ("logprob", pa.float64()),
            ("num_tokens", pa.int32()),
            ("perplexity", pa.float64()),
        ]
    )
    padding_side = "right"

    def __call__(
        self, model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor
    ) -> Tensors:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:]
        logprobs = (
            torch.log_softmax(logits, dim=-1)
            .gather(-1, targets.unsqueeze(-1))
            .squeeze(-1)
        )
        predicted = mask[:, 1:].to(logprobs.dtype)
        total = (logprobs * predicted).sum(dim=1).double()
        count = predicted.sum(dim=1)
        return {
            "logprob": total,
            "num_tokens": count.int(),
            "perplexity": torch.exp(-total / count),
        }

    def columns(self, host: Columns) -> Columns:
        return host


@dataclass(frozen=True)
class Classify:
    """Sequence classification: top label, its probability, and every probability."""

    id2label: dict[int, str]
    num_labels: int
    padding_side = "right"
    labels: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [self.id2label.get(i, str(i)) for i in range(self.num_labels)]
        object.__setattr__(self, "labels", np.array(names, dtype=object))

    @property
    def schema(self) -> pa.Schema:
        return pa.schema(
            [
                ("label", pa.string()),
                ("score", pa.float32()),
                ("probs", pa.list_(pa.float32(), self.num_labels)),
            ]
        )

    def __call__(
        self, model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor
    ) -> Tensors:
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        probs = torch.softmax(logits, dim=-1)
        score, top = probs.max(dim=-1)
        return {"top": top, "score": score, "probs": probs}

    def columns(self, host: Columns) -> Columns:
        return {
            "label": self.labels[host["top"]],
            "score": host["score"],
            "probs": host["probs"],
        }


@dataclass(frozen=True)
class Generate:
    """Greedy continuation; left padding so that every row continues at the end."""

    max_new_tokens: int
    tokenizer: PreTrainedTokenizerBase
    schema = pa.schema([("generated_text", pa.string())])
    padding_side = "left"

    def __call__(
        self, model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor
    ) -> Tensors:
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        return {"tokens": out[:, ids.shape[1] :]}

    def columns(self, host: Columns) -> Columns:
        texts = self.tokenizer.batch_decode(host["tokens"], skip_special_tokens=True)
        return {"generated_text": np.array(texts, dtype=object)}
