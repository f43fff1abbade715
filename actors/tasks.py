"""Task heads: what each task computes from one padded micro-batch.

Each head names its output columns (an Arrow schema, so every Parquet file of a job
agrees) and turns ``input_ids``/``attention_mask`` into one Python value per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from actors.loading import Pooling

Columns = dict[str, list]


class TaskHead(Protocol):
    schema: pa.Schema  # output columns besides id and error
    padding_side: str  # "right", or "left" where generation appends tokens

    def __call__(
        self, model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor
    ) -> Columns: ...


@dataclass(frozen=True)
class Embed:
    """Pooled sentence embedding, as sentence-transformers computes it."""

    pooling: Pooling
    schema = pa.schema([("embedding", pa.list_(pa.float32()))])
    padding_side = "right"

    def __call__(
        self, model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor
    ) -> Columns:
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        pooled = pool(hidden, mask, self.pooling.mode)
        if self.pooling.normalize:
            pooled = F.normalize(pooled, p=2, dim=1)
        return {"embedding": list(pooled.numpy())}


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
    ) -> Columns:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:]
        logprobs = (
            torch.log_softmax(logits, dim=-1)
            .gather(-1, targets.unsqueeze(-1))
            .squeeze(-1)
        )
        predicted = mask[:, 1:].to(logprobs.dtype)
        total = (logprobs * predicted).sum(dim=1).double()
        count = predicted.sum(dim=1).long()
        return {
            "logprob": total.tolist(),
            "num_tokens": count.tolist(),
            "perplexity": torch.exp(-total / count).tolist(),
        }


@dataclass(frozen=True)
class Classify:
    """Sequence classification: top label, its probability, and every probability."""

    id2label: dict[int, str]
    schema = pa.schema(
        [
            ("label", pa.string()),
            ("score", pa.float32()),
            ("probs", pa.list_(pa.float32())),
        ]
    )
    padding_side = "right"

    def __call__(
        self, model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor
    ) -> Columns:
        probs = torch.softmax(
            model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1
        )
        top = probs.argmax(dim=-1).tolist()
        return {
            "label": [self.id2label.get(i, str(i)) for i in top],
            "score": probs.max(dim=-1).values.tolist(),
            "probs": list(probs.numpy()),
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
    ) -> Columns:
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        new_tokens = out[:, ids.shape[1] :]
        return {
            "generated_text": self.tokenizer.batch_decode(
                new_tokens, skip_special_tokens=True
            )
        }
