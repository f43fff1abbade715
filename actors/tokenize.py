"""The tokenize stage: CPU ``map_batches`` tasks between the reader and the actors.

Tokenizing apart from the model keeps the actors on matrix work and lets Ray run it in
parallel on every free core. Rows that already carry an error pass through untouched;
rows too long under ``--on-long error`` or too short for their task get one here.

The tasks tokenize with the fast tokenizer's own engine (``tokenizers``), rebuilt from
the definition transformers' tokenizer gives (``with_backend``, one task on the
driver's node), and import neither transformers nor torch. On an H200 node the tasks
that imported both (AutoTokenizer does) began only as the GPU actors became ready,
8-13 s after the read had finished, while the actors imported the same. A slow
tokenizer, or one with its own code, is still run through transformers.
``load_tokenizer`` here is the one place a tokenizer is loaded, by transformers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import tokenizers
from tokenizers import Encoding, Tokenizer, normalizers, processors

from lmbatch.actors.model_files import fetch_model
from lmbatch.actors.text import check_text
from lmbatch.errors import UserError

if TYPE_CHECKING:
    from ray import ObjectRef

TOKEN_SCHEMA = pa.schema(
    [("id", pa.string()), ("_ids", pa.list_(pa.int32())), ("_error", pa.string())]
)
# A text pair's row: how many of its last tokens are the second text's (type 1).
PAIR_TOKENS = pa.field("_pair_tokens", pa.int32())
# Where the job truncates: whether a row lost tokens to --max-length (the output's
# ``truncated`` column).
TRUNCATED = pa.field("_truncated", pa.bool_())
# --on-long chunk: the tokens of each window of --max-length a row's ``_ids`` holds,
# back to back, each window with the model's special tokens.
WINDOWS = pa.field("_windows", pa.list_(pa.int32()))
# --on-long chunk for score: how many of each window's last tokens it scores (those
# no window before it scored; the rest are context).
WINDOW_SCORED = pa.field("_window_scored", pa.list_(pa.int32()))
# The pipeline's own columns before the predict stage; the rest are kept input columns.
PIPELINE_COLUMNS = (
    "id", "_text", "_pair", "_error", "_ids", PAIR_TOKENS.name, TRUNCATED.name,
    WINDOWS.name, WINDOW_SCORED.name,
)  # fmt: skip


@dataclass(frozen=True)
class TokenizeConfig:
    """What the tokenize tasks need; small and picklable."""

    model_path: str
    max_length: int  # tokens, special tokens included
    on_long: str = "truncate"  # truncate | error | chunk (into windows of max_length)
    overlap: int | None = None  # chunk: tokens a window repeats; None, the task's own
    min_tokens: int = 1  # score needs 2: one to condition on, one to predict
    trust_remote_code: bool = False
    lowercase: bool = False  # sentence-transformers' do_lower_case
    backend: str | None = None  # the fast tokenizer's JSON (``with_backend``)
    prefix: str = ""  # put before every text: a sentence-transformers prompt
    chat: bool = False  # each text a user's message in the model's chat template
    system: str | None = None  # chat: the system message before each user's
    # Which end a long text loses: None, the tokenizer's own side (its start kept);
    # "left" for generate, whose prompt goes on from its end.
    truncation_side: str | None = None
    continuation: bool = False  # score: a pair's second text continues its first
    # Each row a text pair in the tokenizer's pair template (classify's --pair-column).
    pairs: bool = False

    @property
    def window_overlap(self) -> int:
        """Tokens a window repeats of the one before (--on-long chunk)."""
        if self.overlap is not None:
            return self.overlap
        return default_overlap(self.max_length, self.continuation)


def default_overlap(max_length: int, continuation: bool) -> int:
    """--chunk-overlap's default: none between embed's and classify's windows;
    score's end half a window apart, as Hugging Face's perplexity guide strides."""
    return max_length - max(1, max_length // 2) if continuation else 0


class Encoded(NamedTuple):
    """A batch's token ids, as transformers' tokenizer returns ``input_ids``."""

    ids: list[list[int]]
    pair_tokens: list[int] | None = None  # pairs: how many last tokens are the pair's
    truncated: list[bool] | None = None  # where the job truncates: rows cut short
    windows: list[list[int]] | None = None  # chunk: each row's window lengths
    scored: list[list[int]] | None = None  # chunk, score: each window's tokens scored


@lru_cache(maxsize=4)
def load_tokenizer(path: str, trust_remote_code: bool = False, lowercase: bool = False):
    """The model's tokenizer, with a pad token (GPT-2 style models have none);
    ``lowercase`` (sentence-transformers' do_lower_case) puts a Lowercase normalizer
    first, as sentence-transformers does.

    It imports transformers (and with it torch), here rather than at the top: the
    tokenize tasks import this module and must not.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            fetch_model(path, weights=False), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise UserError(
            "--model", f"no usable tokenizer in {path}: {str(e).splitlines()[0]}"
        ) from None
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        # transformers builds an empty one from config.json alone: every word [UNK].
        raise UserError(
            "--model",
            f"no tokenizer files in {path}: its tokenizer has only special tokens",
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if lowercase:
        backend = tokenizer.backend_tokenizer
        rest = [backend.normalizer] if backend.normalizer is not None else []
        backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), *rest])
    return tokenizer


# tokenizers releases whose cut encodings leave out their overflowing pieces
# (huggingface/tokenizers#2091): a long text chunked keeps only its first window, and
# a row cut without special tokens goes unmarked. The H200 machine had 0.23.2, where
# --on-long chunk read 0 of the tiny BERT's 95 long rows whole.
BROKEN_TOKENIZERS = ("0.23.1", "0.23.2")


def check_tokenizers(version: str = tokenizers.__version__) -> None:
    """Refuse a tokenizers release that would drop tokens without saying so. An
    infer job's driver checks its own before Ray starts (nothing written); each job's
    tokenizer task checks again, since a cluster's nodes may have another.

    Raises:
        UserError: naming tokenizers and the release that fixes it.
    """
    if version in BROKEN_TOKENIZERS:
        raise UserError(
            "tokenizers",
            f"{version} loses a text's tokens past --max-length without saying so "
            "(--on-long chunk would read each long text's first window only, and a "
            "row cut without special tokens would not be marked truncated); "
            "pip install 'tokenizers>=0.23.3'",
        )


def with_backend(config: TokenizeConfig) -> TokenizeConfig:
    """``config`` with its tokenizer's definition, where the tokenizer is a fast one of
    transformers' own classes: exactly what transformers' tokenizer runs (special
    tokens, normalizers, sentence-transformers' lowercasing included). It imports
    transformers and torch: an infer job runs it as a task of its own while the job
    starts, and the tokenize tasks take its result by reference."""
    check_tokenizers()
    tokenizer = load_tokenizer(
        config.model_path, config.trust_remote_code, config.lowercase
    )
    check_room(tokenizer, config)
    if not tokenizer.is_fast or not type(tokenizer).__module__.startswith(
        "transformers."
    ):
        return config
    return replace(
        config,
        backend=tokenizer.backend_tokenizer.to_str(),
        truncation_side=config.truncation_side or tokenizer.truncation_side,
    )


def check_room(tokenizer, config: TokenizeConfig) -> None:
    """Refuse a ``--max-length`` that leaves no room for a text after the model's
    special tokens and the prompt (cut from the right, every text would be cut to
    nothing, its row the prompt's alone; ``--on-long chunk`` could put no token of a
    text in a window), or one shorter than the task needs (score: 2 tokens).

    Raises:
        UserError: naming ``--max-length``, or ``--chunk-overlap`` where it fills
            a window.
    """
    if config.chat:
        return  # the template's own tokens: counted where each row is rendered
    side = config.truncation_side or tokenizer.truncation_side
    prompt = 0  # cut from the left (generate), a text keeps its end, not the prompt
    if config.prefix and side != "left":
        prompt = len(tokenizer(config.prefix, add_special_tokens=False)["input_ids"])
    special = tokenizer.num_special_tokens_to_add(pair=config.pairs)
    before = f"the prompt's {_tokens(prompt)} and " if prompt else ""
    texts = 2 if config.pairs else 1  # cut longest first, each keeps a token
    if config.max_length - special - prompt < texts:
        raise UserError(
            "--max-length",
            f"{_tokens(config.max_length)}: no room for "
            f"{'a text pair' if config.pairs else 'a text'} after {before}the "
            f"model's {_tokens(special, 'special ')}; give a longer --max-length"
            f"{' or a shorter prompt' if prompt else ''}",
        )
    if config.max_length < config.min_tokens:
        raise UserError(
            "--max-length",
            f"{_tokens(config.max_length)}, fewer than the {config.min_tokens} this "
            "task needs of a row",
        )
    if config.on_long == "chunk" and config.overlap is not None:
        _check_overlap(config, special, prompt)


def _check_overlap(config: TokenizeConfig, special: int, prompt: int) -> None:
    """Refuse a ``--chunk-overlap`` that fills a window's room for text: score's
    windows are a text's own tokens; embed's and classify's have the model's special
    tokens and the prompt as well."""
    taken = [] if config.continuation else [(special, "special "), (prompt, "prompt ")]
    room = config.max_length - sum(n for n, _ in taken)
    if config.overlap < room:
        return
    less = " and ".join(_tokens(n, kind) for n, kind in taken if n)
    raise UserError(
        "--chunk-overlap",
        f"{config.overlap} tokens leave no new token in a window, which holds "
        f"{_tokens(room)} of text (--max-length {config.max_length}"
        f"{f' less {less}' if less else ''})",
    )


def _tokens(n: int, kind: str = "") -> str:
    return f"{n} {kind}token" if n == 1 else f"{n} {kind}tokens"


def tokenize_batch(batch: pa.Table, config: TokenizeConfig | ObjectRef) -> pa.Table:
    """``id``, ``_text``, ``_error`` (``_pair``, and kept columns) -> ``id``,
    ``_ids``, ``_error`` (``_pair_tokens``, and the kept columns, as they came).

    Rows are checked with Arrow compute, not a Python loop: this stage must keep a
    GPU fed with tens of thousands of rows a second.

    Args:
        config: the config, or a reference to the one ``with_backend`` is building.
    """
    if not isinstance(config, TokenizeConfig):
        config = fetched(config)
    # A task holds one CPU: parallel tasks, not the tokenizer's own thread pool (one
    # thread per core in every task), spread the work over the cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ok = pc.is_null(batch["_error"])
    texts = pc.if_else(ok, pc.fill_null(batch["_text"], ""), "")
    if config.prefix:
        texts = pc.binary_join_element_wise(config.prefix, texts, "")
    texts = texts.to_pylist()
    if config.chat:
        texts = chat_messages(texts, config)
    pairs = None
    if "_pair" in batch.column_names:  # each row a text pair
        pairs = pc.if_else(ok, pc.fill_null(batch["_pair"], ""), "").to_pylist()
    encoded = encode(texts, config, pairs)
    ids = pa.array(encoded.ids, pa.list_(pa.int32()))
    counts = encoded.pair_tokens
    counts = None if counts is None else pa.array(counts, PAIR_TOKENS.type)
    error = row_errors(batch["_error"], ids, counts, config)
    ok = pc.is_null(error)
    ids = pc.if_else(ok, ids, pa.scalar(None, ids.type))
    tokens = pa.table([batch["id"], ids, error], schema=TOKEN_SCHEMA)
    if counts is not None:
        tokens = tokens.append_column(PAIR_TOKENS, pc.if_else(ok, counts, None))
    if encoded.truncated is not None:
        cut = pa.array(encoded.truncated, TRUNCATED.type)
        tokens = tokens.append_column(TRUNCATED, pc.and_(ok, cut))
    for field, values in ((WINDOWS, encoded.windows), (WINDOW_SCORED, encoded.scored)):
        if values is not None:
            values = pa.array(values, field.type)
            tokens = tokens.append_column(field, pc.if_else(ok, values, None))
    for field in batch.schema:  # the kept input columns ride along
        if field.name not in PIPELINE_COLUMNS:
            tokens = tokens.append_column(field, batch[field.name])
    return tokens


def row_errors(
    given: pa.ChunkedArray,
    ids: pa.Array,
    pair_tokens: pa.Array | None,
    config: TokenizeConfig,
) -> pa.Array:
    """Each row's error: the one it came with, else too long or too short for the
    task, or a pair whose second text adds no token."""
    length = pc.list_value_length(ids)
    text = pc.cast(length, pa.string())
    # Chunked rows hold every window: longer than --max-length, none of them is.
    longest = length if config.on_long != "chunk" else pa.scalar(0)
    conditions = [
        pc.invert(pc.is_null(given)),
        pc.greater(longest, config.max_length),
        pc.less(length, config.min_tokens),
    ]
    errors = [
        given,
        pc.binary_join_element_wise(
            "too_long: ", text, f" tokens > --max-length {config.max_length}", ""
        ),
        pc.binary_join_element_wise(
            "too_short: ",
            text,
            pc.if_else(pc.equal(length, 1), " token", " tokens"),
            f", this task needs {config.min_tokens}",
            "",
        ),
    ]
    if pair_tokens is not None:
        conditions.append(pc.equal(pair_tokens, 0))
        errors.append(pa.scalar("too_short: the pair's second text adds no token"))
    return pc.case_when(pc.make_struct(*conditions), *errors)


def chat_messages(texts: list[str], config: TokenizeConfig) -> list[str]:
    """Each text as a user's message in the model's chat template, the assistant's
    turn begun: transformers' own rendering (a generate job's model time dwarfs its
    import here)."""
    tokenizer = load_tokenizer(config.model_path, config.trust_remote_code)
    return [chat_text(tokenizer, text, config.system) for text in texts]


def chat_text(tokenizer, text: str, system: str | None = None) -> str:
    """``text`` as a user's message after ``system``'s (where given), in the
    tokenizer's chat template, the assistant's turn begun."""
    messages = [{"role": "user", "content": text}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )


def encode(
    texts: list[str], config: TokenizeConfig, pairs: list[str] | None = None
) -> Encoded:
    """Token ids of each text, special tokens added (not to a chat template's text,
    which holds its own), cut to ``max_length`` when the job truncates (and which
    rows were cut); what transformers' tokenizer returns as ``input_ids``.

    With ``pairs``, each text and its pair make one sequence in the tokenizer's pair
    template, cut longest first (transformers' ``truncation=True``, as
    sentence-transformers' CrossEncoder tokenizes), or, for score, the pair continues
    the text (``continued``); also returned is how many of each sequence's last tokens
    are the pair's (token type 1; the continuation).
    """
    if pairs is not None and config.continuation:
        return continued(texts, pairs, config)
    if config.on_long == "chunk":
        return chunked(texts, config)
    max_length = config.max_length if config.on_long == "truncate" else None
    special = not config.chat
    given = texts if pairs is None else list(zip(texts, pairs, strict=True))
    if config.backend is not None:
        tokenizer = backend(config.backend, max_length, config.truncation_side)
        # The fast variant skips the character offsets nothing here reads. With the
        # engine called directly, the stage went from 12,122 to 15,581 rows/s on one
        # core (benchmarks/host_feed.py, MiniLM).
        batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        encodings = batch(given, add_special_tokens=special)
        return Encoded(
            [e.ids for e in encodings],
            None if pairs is None else [sum(e.type_ids) for e in encodings],
            None if max_length is None else [bool(e.overflowing) for e in encodings],
        )
    return transformers_encode(texts, config, pairs)


def chunked(texts: list[str], config: TokenizeConfig) -> Encoded:
    """Each text as windows of at most ``max_length`` tokens, back to back: score's
    overlap (``strided``); embed's and classify's repeat ``overlap`` tokens (none by
    default). A text that fits is tokenized as
    --on-long truncate tokenizes it; a longer one is cut into pieces, each with the
    prompt before it and the model's special tokens around (``split``), so that
    every window reads as a whole text would."""
    if config.continuation:  # score
        return strided(texts, config)
    whole = encode(texts, replace(config, on_long="truncate"))
    rows = [[ids] for ids in whole.ids]
    long = [i for i, cut in enumerate(whole.truncated or []) if cut]
    if long:
        alone = [texts[i][len(config.prefix) :] for i in long]  # the prompt apart
        for i, windows in zip(long, split(alone, config), strict=True):
            rows[i] = windows
    return _windows(rows)


def strided(texts: list[str], config: TokenizeConfig) -> Encoded:
    """Score's windows of a long text, as Hugging Face's perplexity guide strides
    them: each window ``max_length`` tokens long, beginning ``window_overlap`` tokens
    (half a window by default) before the one before it ends, scoring the tokens no
    window before it scored, after the rest as context. The first window scores all
    its tokens (but its first, which nothing predicts), so every token after the
    first is scored once."""
    whole = encode(texts, replace(config, on_long="error")).ids
    length = config.max_length
    stride = length - config.window_overlap
    rows, scored = [], []
    for ids in whole:
        ends = [*range(length, len(ids), stride), len(ids)]
        rows.append([ids[max(0, end - length) : end] for end in ends])
        scored.append([e - b for b, e in zip([0, *ends], ends, strict=False)])
    return _windows(rows)._replace(scored=scored)


def split(texts: list[str], config: TokenizeConfig) -> list[list[list[int]]]:
    """Each text's windows: its tokens in pieces that leave room for the prompt and
    the special tokens, each piece after the prompt, in the tokenizer's template."""
    if config.backend is None:
        return _split_by_transformers(texts, config)
    template = backend(config.backend, None, config.truncation_side)
    prompt = template.encode(config.prefix, add_special_tokens=False)
    room = config.max_length - template.num_special_tokens_to_add(False)
    room -= len(prompt.ids)  # at least 1: check_room refused the job otherwise
    pieces = backend(config.backend, room, "right", config.window_overlap)
    return [
        [
            template.post_process(Encoding.merge([prompt, piece])).ids
            for piece in [e, *e.overflowing]
        ]
        for e in pieces.encode_batch(texts, add_special_tokens=False)
    ]


def _split_by_transformers(
    texts: list[str], config: TokenizeConfig
) -> list[list[list[int]]]:
    """``split`` by transformers' tokenizer (one with code of its own): its own
    overflowing windows, which have no room for a prompt."""
    if config.prefix:
        raise UserError(
            "--on-long",
            "chunk puts the prompt before each window with the tokenizers library; "
            "this model's tokenizer is transformers' own: --prompt '' runs without it",
        )
    tokenizer = load_tokenizer(
        config.model_path, config.trust_remote_code, config.lowercase
    )
    out = tokenizer(
        texts,
        truncation=True,
        max_length=config.max_length,
        stride=config.window_overlap,
        return_overflowing_tokens=True,
        return_attention_mask=False,
    )
    if "overflow_to_sample_mapping" not in out:
        raise UserError(
            "--on-long", "chunk needs a fast tokenizer; this model's is not"
        )
    rows: list[list[list[int]]] = [[] for _ in texts]
    mapping = out["overflow_to_sample_mapping"]
    for row, ids in zip(mapping, out["input_ids"], strict=True):
        rows[row].append(ids)
    return rows


def _windows(rows: list[list[list[int]]]) -> Encoded:
    """Rows of windows of ids -> each row's ids back to back, and window lengths."""
    return Encoded(
        [[i for window in row for i in window] for row in rows],
        windows=[[len(window) for window in row] for row in rows],
    )


def transformers_encode(
    texts: list[str], config: TokenizeConfig, pairs: list[str] | None = None
) -> Encoded:
    """``encode`` through transformers' own tokenizer (a slow one, or one with code
    of its own). Only a row cut to exactly ``max_length`` may have been cut: those
    are tokenized again whole to tell."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # long inputs are reported per row, not warned
    tokenizer = load_tokenizer(
        config.model_path, config.trust_remote_code, config.lowercase
    )
    max_length = config.max_length if config.on_long == "truncate" else None
    side = config.truncation_side or tokenizer.truncation_side

    def call(rows: list[int], cut: int | None) -> dict:
        # The tokenizer is cached for the process: the side is set for this call only.
        kept, tokenizer.truncation_side = tokenizer.truncation_side, side
        try:
            return tokenizer(
                [texts[i] for i in rows],
                None if pairs is None else [pairs[i] for i in rows],
                add_special_tokens=not config.chat,
                truncation=cut is not None,
                max_length=cut,
                return_attention_mask=False,
                return_token_type_ids=pairs is not None,
            )
        finally:
            tokenizer.truncation_side = kept

    out = call(list(range(len(texts))), max_length)
    ids = out["input_ids"]
    types = None if pairs is None else [sum(t) for t in out["token_type_ids"]]
    if max_length is None:
        return Encoded(ids, types)
    full = [i for i, row in enumerate(ids) if len(row) == max_length]
    truncated = [False] * len(ids)
    for i, row in zip(full, call(full, None)["input_ids"] if full else [], strict=True):
        truncated[i] = len(row) > max_length
    return Encoded(ids, types, truncated)


def continued(texts: list[str], pairs: list[str], config: TokenizeConfig) -> Encoded:
    """Each text followed by its continuation, tokenized as lm-evaluation-harness's
    loglikelihood does: the continuation's tokens are those of both texts together
    beyond those of the text alone (a merge across the join stays one token).

    Where the job truncates, the context is cut from the left, so that what is scored
    stays whole; a continuation that leaves no token of context is not cut, and its
    row is too long.
    """
    whole_texts = [t + p for t, p in zip(texts, pairs, strict=True)]
    uncut = replace(config, on_long="error")
    whole = encode(whole_texts, uncut).ids
    context = encode(texts, uncut).ids
    counts = [max(0, len(w) - len(c)) for w, c in zip(whole, context, strict=True)]
    if config.on_long != "truncate":
        return Encoded(whole, counts)
    keep = config.max_length
    cut = [len(w) > keep and n < keep for w, n in zip(whole, counts, strict=True)]
    whole = [w[-keep:] if c else w for w, c in zip(whole, cut, strict=True)]
    return Encoded(whole, counts, cut)


@lru_cache(maxsize=2)
def fetched(ref: ObjectRef) -> TokenizeConfig:
    """The config behind ``ref``, waited for once per task process."""
    import ray

    return ray.get(ref)


@lru_cache(maxsize=2)
def backend(
    definition: str, max_length: int | None, side: str, stride: int = 0
) -> Tokenizer:
    """A tokenizer rebuilt once per task process, set as transformers sets it for a
    call: no padding, truncation to ``max_length`` from ``side`` (or none), each
    overflowing piece repeating ``stride`` tokens of the one before."""
    tokenizer = Tokenizer.from_str(definition)
    tokenizer.no_padding()
    if max_length is None:
        tokenizer.no_truncation()
        return tokenizer
    if stride:
        # Pieces get no special tokens here (the template adds them to each), but
        # the library would take them off the room a stride may fill.
        tokenizer.post_processor = processors.Sequence([])
    tokenizer.enable_truncation(max_length, stride=stride, direction=side)
    return tokenizer


def actor_batch(
    texts: list[str],
    config: TokenizeConfig,
    pairs: list[str] | None = None,
    ids: list[str] | None = None,
) -> pa.Table:
    """``texts`` (and their ``pairs``) as a Predictor receives them from the
    tokenize stage: ids by position unless given, a bad text (empty, not UTF-8
    text, too long) carried as its ``_error``."""
    text, error = check_text(pa.chunked_array([pa.array(texts, pa.string())]))
    ids = [str(i) for i in range(len(texts))] if ids is None else ids
    columns = {"id": pa.array(ids, pa.string())}
    columns |= {"_text": text, "_error": error}
    if pairs is not None:
        pair, pair_error = check_text(
            pa.chunked_array([pa.array(pairs, pa.string())]), "pair"
        )
        columns |= {"_error": pc.coalesce(error, pair_error), "_pair": pair}
    return tokenize_batch(pa.table(columns), config)
