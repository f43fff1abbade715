"""Shared fixtures: one real local Ray for the session, tiny models built from configs.

No hub downloads: the tokenizer is a word-level one built here from a fixed vocabulary,
and every model is a 2-layer, 32-wide config saved as safetensors.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Models fetched from URIs go to a cache of the test session's own, here and in every
# Ray worker (they inherit this environment when the session's Ray starts).
CACHE = os.environ["LMBATCH_CACHE"] = tempfile.mkdtemp(prefix="lmbatch-cache-")

WORDS = """
the a of and to in is it that for on with as was he she they we you are be this have
from or one had by word but not what all were when your can said there use an each
which do how their if will up other about out many then them these so some her would
make like him into time has look two more write go see number no way could people my
than first water been call who oil its now find long down day did get come made may
""".split()


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C at its default for the commands the tests start (and stop with it), as
    a terminal starts them: a shell's background job (`make test &`) begins with
    SIGINT ignored, and every child would inherit that. A handler, unlike an
    ignored signal, is reset to the default in each child."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_unconfigure(config: pytest.Config) -> None:
    """The session's model cache goes with it (the session's Ray is down by now)."""
    shutil.rmtree(CACHE, ignore_errors=True)


SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[BOS]", "[EOS]"]
MAX_POSITIONS = 64


def make_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer; BERT-style adds [CLS]/[SEP], Llama-style a [BOS]."""
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",  # cross-encoders read text pairs
            special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
        )
    elif kind == "llama":
        tk.post_processor = processors.TemplateProcessing(
            single="[BOS] $A", special_tokens=[("[BOS]", 4)]
        )
    extra = {"pad_token": "[PAD]"} if kind != "gpt2" else {}
    if kind == "bert":  # as BERT's own tokenizers: token types, for text pairs
        extra["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        model_max_length=MAX_POSITIONS,
        **extra,
    )


def _save(model, tokenizer, path: Path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """name -> model directory: bert, bert_st, bert64, bert_cls, gpt2, llama, oom_*."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    vocab = len(SPECIALS) + len(WORDS)
    bert_cfg = dict(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=MAX_POSITIONS,
    )
    bert_tok = make_tokenizer("bert")
    out = {
        "bert": _save(BertModel(BertConfig(**bert_cfg)), bert_tok, root / "bert"),
        "bert_cls": _save(
            BertForSequenceClassification(
                BertConfig(
                    **bert_cfg,
                    num_labels=3,
                    id2label={0: "neg", 1: "neutral", 2: "pos"},
                    label2id={"neg": 0, "neutral": 1, "pos": 2},
                )
            ),
            bert_tok,
            root / "bert_cls",
        ),
        "gpt2": _save(
            GPT2LMHeadModel(
                GPT2Config(
                    vocab_size=vocab,
                    n_embd=32,
                    n_layer=2,
                    n_head=2,
                    n_positions=MAX_POSITIONS,
                    bos_token_id=4,
                    eos_token_id=5,
                )
            ),
            make_tokenizer("gpt2"),
            root / "gpt2",
        ),
        "llama": _save(
            LlamaForCausalLM(
                LlamaConfig(
                    vocab_size=vocab,
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    num_key_value_heads=1,
                    max_position_embeddings=MAX_POSITIONS,
                    bos_token_id=4,
                    eos_token_id=5,
                    pad_token_id=0,
                )
            ),
            make_tokenizer("llama"),
            root / "llama",
        ),
    }
    out["bert_st"] = _sentence_transformers_dir(out["bert"], root / "bert_st")
    # bitsandbytes' 4-bit CPU kernels pack weights in blocks of 64 input features.
    wide = {**bert_cfg, "hidden_size": 64, "intermediate_size": 128}
    out["bert64"] = _save(BertModel(BertConfig(**wide)), bert_tok, root / "bert64")
    for threshold in (150, 600):
        out[f"oom_{threshold}"] = _oom_bert(
            bert_cfg, bert_tok, threshold, root / f"oom_{threshold}"
        )
    return out


def _oom_bert(config: dict, tokenizer, threshold: int, path: Path) -> str:
    """A BERT that raises torch.OutOfMemoryError above ``threshold`` tokens."""
    from oom_model import OomBertConfig, OomBertModel

    OomBertConfig.register_for_auto_class()
    OomBertModel.register_for_auto_class("AutoModel")
    torch.manual_seed(0)
    model = OomBertModel(OomBertConfig(oom_above_tokens=threshold, **config))
    return _save(model, tokenizer, path)


def _sentence_transformers_dir(bert: str, path: Path) -> str:
    """That BERT laid out as sentence-transformers does: CLS pooling, no Normalize."""
    import shutil

    shutil.copytree(bert, path)
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 32,
                "pooling_mode_cls_token": True,
                "pooling_mode_mean_tokens": False,
            }
        )
    )
    (path / "modules.json").write_text(
        json.dumps(
            [
                {
                    "idx": 0,
                    "name": "0",
                    "path": "",
                    "type": "sentence_transformers.models.Transformer",
                },
                {
                    "idx": 1,
                    "name": "1",
                    "path": "1_Pooling",
                    "type": "sentence_transformers.models.Pooling",
                },
            ]
        )
    )
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16}))
    return str(path)


def sentences(n: int, seed: int = 0, max_words: int = 20) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(2, max_words))) for _ in range(n)]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, str]:
    """The same 120 rows as Parquet, JSONL and CSV, with a ``doc`` id column."""
    root = tmp_path_factory.mktemp("corpus")
    texts = sentences(120)
    table = pa.table(
        {"doc": [f"doc-{i:03d}" for i in range(len(texts))], "text": texts}
    )
    pq.write_table(table, root / "rows.parquet", row_group_size=50)
    with open(root / "rows.jsonl", "w") as f:
        for row in table.to_pylist():
            f.write(json.dumps(row) + "\n")
    table.to_pandas().to_csv(root / "rows.csv", index=False)
    return {
        "parquet": str(root / "rows.parquet"),
        "jsonl": str(root / "rows.jsonl"),
        "csv": str(root / "rows.csv"),
        "texts": texts,
    }


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session; 2 CPUs as on CI."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def embedded_corpus_dir(tmp_path_factory) -> Path:
    """The output embedded_corpus's job writes: tests read it, none writes to it."""
    return tmp_path_factory.mktemp("embedded") / "out"


@pytest.fixture(scope="session")
def embedded_corpus(ray_local, tiny_models, corpus, embedded_corpus_dir):
    """(rows by doc, summary) of the tiny BERT's embed job on the corpus's Parquet,
    run once: what other formats and inputs of the same rows must reproduce. Each
    job is ten seconds of actor start-up on 2 cores; tests share this one."""
    from helpers import run_job

    return run_job(embedded_corpus_dir, model=tiny_models["bert"],
                   inputs=corpus["parquet"], task="embed", id_column="doc")  # fmt: skip


@pytest.fixture
def fault_report(request):
    """record(rows_in, ids_out, computed, **extra): what a fault cost, checked here and,
    when LMBATCH_FAULT_REPORT names a file (benchmarks/faults.py), appended to it.

    ``computed``: rows the model processed, every actor life counted; recomputed is
    what exceeds the rows that needed computing (``rows_in - restored``)."""

    def record(rows_in: int, ids_out: list[str], computed: int, restored: int = 0,
               **extra) -> dict:  # fmt: skip
        row = {
            "fault": request.node.get_closest_marker("fault").args[0],
            "rows_in": rows_in,
            "rows_out": len(ids_out),
            "lost": rows_in - len(set(ids_out)),
            "duplicated": len(ids_out) - len(set(ids_out)),
            "restored": restored,
            "recomputed": computed - (rows_in - restored),
            **extra,
        }
        if os.environ.get("LMBATCH_FAULT_REPORT"):
            with open(os.environ["LMBATCH_FAULT_REPORT"], "a") as f:
                f.write(json.dumps(row) + "\n")
        assert row["lost"] == 0 and row["duplicated"] == 0, row
        return row

    return record
