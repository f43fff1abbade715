"""Task heads: what each task computes from one padded micro-batch.

A head runs on the model's device and returns tensors there (``__call__``); the
Predictor brings them to host memory in one place (``actors/transfer.py``) and the head
turns the host arrays into its output columns (``columns``), one entry per row along
the first axis. Each head names its columns as an Arrow schema, so every Parquet file
of a job agrees; vectors are fixed-size lists built from one contiguous array.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteriaList,
    StopStringCriteria,
)

from lmbatch.actors.draws import sampling_processors
from lmbatch.actors.sampling import Sampling
from lmbatch.actors.sentence import Dense, Encoding, Sentence
from lmbatch.actors.stopping import RowEnds, stop_strings

Tensors = dict[str, torch.Tensor]
Columns = dict[str, np.ndarray]
# Each head also returns, under FINITE, whether each row's values are all finite. A
# model that overflows fp16's range (65,504) computes NaN or inf: the Predictor makes
# such a row a ``not_finite`` error rather than write NaN that poisons what reads it.
FINITE = "_finite"


def finite_rows(values: torch.Tensor) -> torch.Tensor:
    """[rows, ...] -> [rows]: whether every value of each row is finite."""
    finite = torch.isfinite(values)
    return finite.flatten(1).all(1) if finite.dim() > 1 else finite


class TaskHead(Protocol):
    schema: pa.Schema  # output columns besides id and error
    padding_side: str  # "right", or "left" where generation appends tokens

    def __call__(
        self, model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor
    ) -> Tensors:
        """Classify and score also take a third tensor: where a text pair's second
        text is (classify: its token types; score: the continuation scored);
        generate, sampling, each row's key."""

    def columns(self, host: Columns) -> Columns:
        """The output columns from the host copies of what ``__call__`` returned,
        less ``FINITE``."""

    # Embed, Score and Classify also ``merge`` a long text's windows into its row's
    # values (--on-long chunk; ``outputs.Windows``).


def token_mean(
    values: np.ndarray, first: np.ndarray, tokens: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's mean of its windows' ``values``, weighted by their ``tokens``
    (``first``: each row's first window): a row of one window keeps its own values,
    with no loop and no sums over those. -> (means, the rows of several windows)"""
    counts = np.diff(first, append=len(values))
    out = values[first]
    several = np.flatnonzero(counts > 1)
    if len(several):
        of_several = np.repeat(counts > 1, counts)
        weights = tokens[of_several].astype(np.float64)
        starts = np.cumsum(counts[several]) - counts[several]
        mean = np.add.reduceat(values[of_several] * weights[:, None], starts)
        out[several] = mean / np.add.reduceat(weights, starts)[:, None]
    return out, several


class Embed:
    """Sentence embedding as sentence-transformers computes it: pooling in the
    model's modes, then its Dense and Normalize modules in their order."""

    padding_side = "right"

    def __init__(
        self,
        sentence: Sentence,
        hidden_size: int,
        model_dir: str,
        device: torch.device,
        prompt_tokens: int = 0,
        encoding: Encoding | None = None,
        windows: bool = False,
    ) -> None:
        """``prompt_tokens``: the leading tokens left out of pooling (a prompt where
        the model's Pooling has ``include_prompt: false``); ``encoding``: what is
        done to each vector after every module of the model; ``windows``: each
        micro-batch row is a window of a longer text (--on-long chunk), whose vector
        is returned as the model's modules leave it, for ``merge``."""
        self.modes = sentence.modes
        self.prompt_tokens = prompt_tokens
        self.encoding = encoding = encoding or Encoding()
        self.windows = windows
        self.normalized = sentence.steps[-1:] == ("normalize",)
        self.steps = [
            _dense(model_dir, step, device) if isinstance(step, Dense) else _normalize
            for step in sentence.steps
        ]
        value = {"float32": pa.float32(), "binary": pa.int8(), "ubinary": pa.uint8()}
        width = encoding.width(sentence.width(hidden_size))
        self.schema = pa.schema(
            [("embedding", pa.list_(value[encoding.precision], width))]
        )

    def __call__(
        self, model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor
    ) -> Tensors:
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        embedding = self.embedding(hidden, mask)
        return {
            "embedding": embedding if self.windows else self.encode(embedding),
            FINITE: finite_rows(embedding),  # before packing signs hides a NaN
        }

    def encode(self, embedding: torch.Tensor) -> torch.Tensor:
        """The model's vectors as the user asked: cut, normalised, packed."""
        encoding = self.encoding
        embedding = embedding[:, : encoding.truncate_dim]
        if encoding.normalize:
            embedding = _normalize(embedding)
        if encoding.precision != "float32":
            embedding = pack_signs(embedding, signed=encoding.precision == "binary")
        return embedding

    def merge(self, windows: Columns, first: np.ndarray, tokens: np.ndarray) -> Columns:
        """Rows' embeddings from their windows' (--on-long chunk; ``first``: each
        row's first window, ``tokens``: each window's): a row of one window keeps its
        vector; a longer text's is the mean of its windows' by tokens, L2-normalised
        again where the model's own last module normalises. Then encoded, on the
        host: the windows' vectors have left the device."""
        out, several = token_mean(windows["embedding"], first, tokens)
        if self.normalized:
            norms = np.linalg.norm(out[several], axis=1, keepdims=True)
            out[several] /= norms.clip(1e-12)
        return {"embedding": self.encode(torch.from_numpy(out)).numpy()}

    def embedding(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Right-padded token states to the model's sentence embedding (also what an
        optimize job measures fidelity on and distils towards)."""
        embedding = pool(hidden.float(), mask, self.modes, self.prompt_tokens)
        for step in self.steps:
            embedding = step(embedding)
        return embedding

    def columns(self, host: Columns) -> Columns:
        return host


def module_weights(file: Path) -> dict[str, torch.Tensor]:
    """A module's tensors from safetensors, or from a pickle, tensors only (what
    --allow-pickle trusts)."""
    if file.suffix == ".safetensors":
        return load_file(str(file))
    return torch.load(file, map_location="cpu", weights_only=True)


def _dense(model_dir: str, dense: Dense, device: torch.device):
    """A sentence-transformers Dense module: its Linear, loaded from safetensors, or
    from the pickle an older model keeps (read_sentence allowed it: --allow-pickle),
    tensors only."""
    linear = nn.Linear(dense.in_features, dense.out_features, bias=dense.bias)
    state = module_weights(Path(model_dir) / dense.folder / dense.weights)
    prefix = "linear."
    linear.load_state_dict(
        {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    )
    linear = linear.float().to(device).eval().requires_grad_(False)
    activation = getattr(nn, dense.activation)()  # whitelisted by read_sentence

    def step(x: torch.Tensor) -> torch.Tensor:
        out = activation(linear(x))
        return out + x if dense.residual else out

    return step


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2, dim=-1)


def pack_signs(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """[rows, d] -> [rows, ceil(d / 8)] bytes, a bit a dimension, 1 where it is above
    0, the first dimension the high bit (numpy's packbits, as sentence-transformers
    packs): uint8, or with ``signed`` those less 128 as int8. On the device, so
    that a 32nd of the bytes leaves it."""
    bits = F.pad(x > 0, (0, -x.shape[1] % 8)).view(x.shape[0], -1, 8)
    weights = 2 ** torch.arange(7, -1, -1, device=x.device, dtype=torch.int32)
    packed = (bits * weights).sum(-1, dtype=torch.int32)
    return (packed - 128).to(torch.int8) if signed else packed.to(torch.uint8)


def pool(
    hidden: torch.Tensor, mask: torch.Tensor, modes: tuple[str, ...], skip: int = 0
) -> torch.Tensor:
    """Right-padded token states pooled in each mode, concatenated in that order
    (sentence-transformers' Pooling: several modes make one wider vector). The first
    ``skip`` tokens (a prompt) are left out, as its Pooling leaves them out: of every
    mode but cls and lasttoken."""
    pooled = mask
    if skip:
        pooled = mask.clone()
        pooled[:, :skip] = 0
    m = pooled.unsqueeze(-1).to(hidden.dtype)
    counts = m.sum(dim=1).clamp(min=1e-9)
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(hidden[:, 0])
        elif mode == "max":
            out.append(hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values)
        elif mode == "mean":
            out.append((hidden * m).sum(dim=1) / counts)
        elif mode == "mean_sqrt_len_tokens":
            out.append((hidden * m).sum(dim=1) / counts.sqrt())
        elif mode == "weightedmean":
            positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device)
            weights = m * positions.view(1, -1, 1).to(hidden.dtype)
            total = weights.sum(dim=1).clamp(min=1e-9)
            out.append((hidden * weights).sum(dim=1) / total)
        elif mode == "lasttoken":
            last = mask.sum(dim=1) - 1
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            out.append(hidden[rows, last])
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return torch.cat(out, dim=-1)


@dataclass(frozen=True)
class Score:
    """Log-probability of each text under a causal LM: sum over predicted tokens (a
    continuation's only, where rows are pairs), and whether each of them is the
    model's most likely next token (lm-evaluation-harness's ``is_greedy``)."""

    schema = pa.schema(
        [
            ("logprob", pa.float64()),
            ("num_tokens", pa.int32()),
            ("perplexity", pa.float64()),
            ("is_greedy", pa.bool_()),
        ]
    )
    padding_side = "right"

    def __call__(
        self,
        model: PreTrainedModel,
        ids: torch.Tensor,
        mask: torch.Tensor,
        scored: torch.Tensor | None = None,
    ) -> Tensors:
        """``scored``: the tokens to score, a continuation's (1), where rows are
        (context, continuation) pairs; else every token after the first."""
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:]
        logprobs = (
            torch.log_softmax(logits, dim=-1)
            .gather(-1, targets.unsqueeze(-1))
            .squeeze(-1)
        )
        predicted = (mask if scored is None else scored)[:, 1:].to(logprobs.dtype)
        total = (logprobs * predicted).sum(dim=1).double()
        count = predicted.sum(dim=1)
        greedy = (logits.argmax(dim=-1) == targets) | (predicted == 0)
        return {
            "logprob": total,
            "num_tokens": count.int(),
            "perplexity": torch.exp(-total / count),
            "is_greedy": greedy.all(dim=1),
            FINITE: torch.isfinite(total),
        }

    def columns(self, host: Columns) -> Columns:
        return host

    def merge(self, windows: Columns, first: np.ndarray, tokens: np.ndarray) -> Columns:
        """Rows' scores from their windows' (--on-long chunk, ``first``: each row's
        first window): each window scored tokens no other did, so a row's are sums."""
        logprob = np.add.reduceat(windows["logprob"], first)
        count = np.add.reduceat(windows["num_tokens"], first)
        return {
            "logprob": logprob,
            "num_tokens": count.astype(np.int32),
            "perplexity": np.exp(-logprob / count),
            "is_greedy": np.logical_and.reduceat(windows["is_greedy"], first),
        }


@dataclass(frozen=True)
class Classify:
    """Sequence classification: top label, its score, and every label's score. The
    scores are the logits through ``function`` (model_info.classify_function):
    softmax, sigmoid (multi-label, or a single output) or none (regression)."""

    id2label: dict[int, str]
    num_labels: int
    function: str = "softmax"
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
        self,
        model: PreTrainedModel,
        ids: torch.Tensor,
        mask: torch.Tensor,
        types: torch.Tensor | None = None,
    ) -> Tensors:
        """``types``: the token types of text pairs, where the model takes them."""
        pair = {} if types is None else {"token_type_ids": types}
        logits = model(input_ids=ids, attention_mask=mask, **pair).logits.float()
        if self.function == "softmax":
            probs = torch.softmax(logits, dim=-1)
        elif self.function == "sigmoid":
            probs = torch.sigmoid(logits)
        else:
            probs = logits
        score, top = probs.max(dim=-1)
        return {"top": top, "score": score, "probs": probs, FINITE: finite_rows(probs)}

    def columns(self, host: Columns) -> Columns:
        return {
            "label": self.labels[host["top"]],
            "score": host["score"],
            "probs": host["probs"],
        }

    def merge(self, windows: Columns, first: np.ndarray, tokens: np.ndarray) -> Columns:
        """Rows' scores from their windows' (--on-long chunk): each label's mean
        over the windows, weighted by their tokens; the row's label, the highest."""
        probs, _ = token_mean(windows["probs"], first, tokens)
        top = probs.argmax(axis=1)
        score = probs[np.arange(len(probs)), top]
        return self.columns({"top": top, "score": score, "probs": probs})


@dataclass(frozen=True)
class Generate:
    """Greedy continuation, or sampled where ``sampling`` says how (each row's draws
    from its own key: ``actors/draws.py``); left padding so that every row continues
    at the end. A row ends at an end-of-text token or a ``stop`` string
    (``actors/stopping.py``), the string left out of its text."""

    max_new_tokens: int
    tokenizer: PreTrainedTokenizerBase
    end_ids: tuple[int, ...]  # stopping.end_ids
    sampling: Sampling | None = None
    stop: tuple[str, ...] = ()
    # The memory probe's worst case: every row runs to max_new_tokens (no eos).
    full_length: bool = False
    schema = pa.schema(
        [
            ("generated_text", pa.string()),
            ("finish_reason", pa.string()),  # stop: ended; length: max_new_tokens
            ("generated_tokens", pa.int32()),  # the token that ended it included
        ]
    )
    padding_side = "left"

    @cached_property
    def stop_strings(self) -> StopStringCriteria | None:
        return stop_strings(self.tokenizer, self.stop)

    def __call__(
        self,
        model: PreTrainedModel,
        ids: torch.Tensor,
        mask: torch.Tensor,
        keys: torch.Tensor | None = None,
    ) -> Tensors:
        """``keys``: each row's key (``sampling.row_keys``), where it samples."""
        rows, prompt_length = ids.shape
        ends = RowEnds(
            torch.tensor(self.end_ids, dtype=torch.long, device=ids.device),
            self.stop_strings,
            prompt_length,
            rows,
        )
        options = {"min_new_tokens": self.max_new_tokens} if self.full_length else {}
        if self.end_ids:  # a model and tokenizer that name none: no end token
            options["eos_token_id"] = list(self.end_ids)
        watch = NanWatch(rows, ids.device)
        processors = LogitsProcessorList([watch])
        if self.sampling is not None:  # greedy then keeps each row's drawn token
            processors += sampling_processors(self.sampling, keys, prompt_length)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            stopping_criteria=StoppingCriteriaList([ends]),
            logits_processor=processors,
            **options,
        )
        tokens = out[:, prompt_length:]
        return {
            "tokens": tokens,
            "lengths": ends.lengths(tokens.shape[1]),
            "ended": ends.ended_at >= 0,
            FINITE: ~watch.seen,
        }

    def columns(self, host: Columns) -> Columns:
        rows = zip(host["tokens"], host["lengths"], strict=True)
        texts = self.tokenizer.batch_decode(
            [row[:n].tolist() for row, n in rows], skip_special_tokens=True
        )
        return {
            "generated_text": np.array([self._cut(t) for t in texts], dtype=object),
            "finish_reason": np.where(host["ended"], "stop", "length").astype(object),
            "generated_tokens": host["lengths"].astype(np.int32),
        }

    def _cut(self, text: str) -> str:
        """The text before its first stop string."""
        found = [at for s in self.stop if (at := text.find(s)) >= 0]
        return text[: min(found)] if found else text


class NanWatch(LogitsProcessor):
    """Marks each row whose next-token scores held a NaN or +inf at any step (an
    overflowed model's: its text would be noise); the scores pass on unchanged.
    -inf is no sign: processors set it to rule tokens out."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self.seen = torch.zeros(rows, dtype=torch.bool, device=device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        top = scores.amax(-1)  # NaN where any is; a row's values, not a vocabulary's
        self.seen |= top.isnan() | top.isposinf()
        return scores
