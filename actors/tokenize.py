"""The tokenize stage: CPU ``map_batches`` tasks between the reader and the actors.

Tokenizing apart from the model keeps the actors on matrix work and lets Ray run it in
parallel on every free core. Rows that already carry an error pass through untouched;
rows too long under ``--on-long error`` or too short for their task get one here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from transformers.utils import logging as hf_logging

from actors.loading import load_tokenizer

TOKEN_SCHEMA = pa.schema(
    [("id", pa.string()), ("_ids", pa.list_(pa.int32())), ("_error", pa.string())]
)


@dataclass(frozen=True)
class TokenizeConfig:
    """What the tokenize tasks need; small and picklable."""

    model_path: str
    max_length: int  # tokens, special tokens included
    on_long: str = "truncate"  # truncate | error
    min_tokens: int = 1  # score needs 2: one to condition on, one to predict
    trust_remote_code: bool = False


def tokenize_batch(batch: pa.Table, config: TokenizeConfig) -> pa.Table:
    """``id``, ``_text``, ``_error`` -> ``id``, ``_ids``, ``_error``."""
    hf_logging.set_verbosity_error()  # long inputs are reported per row, not warned
    tokenizer = load_tokenizer(config.model_path, config.trust_remote_code)
    errors = batch["_error"].to_pylist()
    todo = [i for i, e in enumerate(errors) if e is None]
    texts = pc.take(batch["_text"], pa.array(todo, pa.int64())).to_pylist()
    truncate = config.on_long == "truncate"
    encoded = tokenizer(
        texts, truncation=truncate, max_length=config.max_length if truncate else None
    )
    ids: list[np.ndarray | None] = [None] * batch.num_rows
    for row, tokens in zip(todo, encoded["input_ids"], strict=True):
        if len(tokens) > config.max_length:
            errors[row] = (
                f"too_long: {len(tokens)} tokens > --max-length {config.max_length}"
            )
        elif len(tokens) < config.min_tokens:
            errors[row] = (
                f"too_short: {len(tokens)} tokens, this task needs {config.min_tokens}"
            )
        else:
            ids[row] = np.asarray(tokens, dtype=np.int32)
    return pa.table(
        [
            batch["id"],
            pa.array(ids, pa.list_(pa.int32())),
            pa.array(errors, pa.string()),
        ],
        schema=TOKEN_SCHEMA,
    )


def check_text(column: pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """-> (text or null, error or null); the error names what is wrong with the row."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        if pa.types.is_null(column.type):
            kind = pa.array(["null_text: text is null"] * len(column), pa.string())
        else:
            kind = pa.array(
                [f"not_string: text is {column.type}"] * len(column), pa.string()
            )
        return pa.nulls(len(column), pa.string()), kind
    text = pc.cast(column, pa.string())
    error = pc.if_else(
        pc.is_null(text),
        "null_text: text is null",
        pc.if_else(
            pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0),
            "empty_text: text is empty",
            pa.scalar(None, pa.string()),
        ),
    )
    return text.combine_chunks(), error.combine_chunks()


def actor_batch(texts: list[str], config: TokenizeConfig) -> dict[str, object]:
    """``texts`` as a Predictor receives them from the tokenize stage: ids by position,
    a bad text (empty, not UTF-8 text, too long) carried as its ``_error``."""
    text, error = check_text(pa.chunked_array([pa.array(texts, pa.string())]))
    ids = pa.array([str(i) for i in range(len(texts))], pa.string())
    tokens = tokenize_batch(
        pa.table({"id": ids, "_text": text, "_error": error}), config
    )
    return {
        "id": np.array(tokens["id"].to_pylist(), dtype=object),
        "_ids": [
            None if x is None else np.asarray(x, dtype=np.int32)
            for x in tokens["_ids"].to_pylist()
        ],
        "_error": np.array(tokens["_error"].to_pylist(), dtype=object),
    }
