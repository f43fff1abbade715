"""The tokenize stage: CPU ``map_batches`` tasks between the reader and the actors.

Tokenizing apart from the model keeps the actors on matrix work and lets Ray run it in
parallel on every free core. Rows that already carry an error pass through untouched;
rows too long under ``--on-long error`` or too short for their task get one here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from transformers.utils import logging as hf_logging

from lmbatch.actors.loading import load_tokenizer
from lmbatch.actors.text import check_text

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
    lowercase: bool = False  # sentence-transformers' do_lower_case


def tokenize_batch(batch: pa.Table, config: TokenizeConfig) -> pa.Table:
    """``id``, ``_text``, ``_error`` (and kept columns) -> ``id``, ``_ids``,
    ``_error`` (and the kept columns, as they came).

    Rows are checked with Arrow compute, not a Python loop: this stage must keep a
    GPU fed with tens of thousands of rows a second.
    """
    hf_logging.set_verbosity_error()  # long inputs are reported per row, not warned
    # A task holds one CPU: parallel tasks, not the tokenizer's own thread pool (one
    # thread per core in every task), spread the work over the cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = load_tokenizer(
        config.model_path, config.trust_remote_code, config.lowercase
    )
    ok = pc.is_null(batch["_error"])
    texts = pc.if_else(ok, pc.fill_null(batch["_text"], ""), "").to_pylist()
    truncate = config.on_long == "truncate"
    encoded = tokenizer(
        texts,
        truncation=truncate,
        max_length=config.max_length if truncate else None,
        return_attention_mask=False,
        return_token_type_ids=False,
    )["input_ids"]
    ids = pa.array(encoded, pa.list_(pa.int32()))
    lengths = pc.cast(pc.list_value_length(ids), pa.string())
    error = pc.case_when(
        pc.make_struct(
            pc.invert(ok),
            pc.greater(pc.list_value_length(ids), config.max_length),
            pc.less(pc.list_value_length(ids), config.min_tokens),
        ),
        batch["_error"],
        pc.binary_join_element_wise(
            "too_long: ", lengths, f" tokens > --max-length {config.max_length}", ""
        ),
        pc.binary_join_element_wise(
            "too_short: ",
            lengths,
            f" tokens, this task needs {config.min_tokens}",
            "",
        ),
    )
    ids = pc.if_else(pc.is_null(error), ids, pa.scalar(None, ids.type))
    tokens = pa.table([batch["id"], ids, error], schema=TOKEN_SCHEMA)
    for name in batch.column_names[3:]:  # the kept input columns ride along
        tokens = tokens.append_column(batch.schema.field(name), batch[name])
    return tokens


def actor_batch(texts: list[str], config: TokenizeConfig) -> pa.Table:
    """``texts`` as a Predictor receives them from the tokenize stage: ids by position,
    a bad text (empty, not UTF-8 text, too long) carried as its ``_error``."""
    text, error = check_text(pa.chunked_array([pa.array(texts, pa.string())]))
    ids = pa.array([str(i) for i in range(len(texts))], pa.string())
    return tokenize_batch(pa.table({"id": ids, "_text": text, "_error": error}), config)
