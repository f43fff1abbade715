"""Run a job in-process on the session's Ray and read its output back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from lmbatch.jobs.infer import run_infer
from lmbatch.jobs.spec import InferSpec, prepare_infer
from lmbatch.jobs.summary import Summary


def run_job(output, **flags) -> tuple[dict, Summary]:
    """-> (rows by id, summary). Flags are InferSpec fields; inputs may be a str."""
    if isinstance(flags.get("inputs"), str):
        flags["inputs"] = (flags["inputs"],)
    summary = run_infer(
        prepare_infer(InferSpec.from_flags(output=str(output), **flags))
    )
    table = pq.read_table(output)
    return {row["id"]: row for row in table.to_pylist()}, summary


def actor_rows(output, **flags) -> dict:
    """The rows ``run_job(output, **flags)`` would write, computed by the actor's own
    code in this process on CPU, with no Ray job: a reference for the GPU tests, whose
    pytest-xdist workers would each start a CPU job per task (most of a test's time
    is a job's start-up). Inputs: one Parquet file with a ``text`` column."""
    from lmbatch.actors.predictor import Predictor
    from lmbatch.actors.tokenize import actor_batch, with_backend
    from lmbatch.jobs.infer import predictor_config, tokenize_settings

    flags["inputs"] = (flags["inputs"],)
    plan = prepare_infer(InferSpec.from_flags(output=str(output), **flags))
    tokens = tokenize_settings(plan.spec, plan.model, plan.max_length, plan.prompt)
    actor = Predictor(predictor_config(plan, "cpu", threads=2, actors_per_node=1))
    table = pq.read_table(flags["inputs"][0])
    ids = table[plan.spec.id_column].to_pylist()
    out = actor(actor_batch(table["text"].to_pylist(), with_backend(tokens), ids=ids))
    return {row["id"]: row for row in out.to_pylist()}


def write_rows(path, n: int, start: int = 0) -> None:
    """``n`` short, distinct JSONL rows: inputs long enough to interrupt."""
    path.write_text(
        "".join(
            json.dumps({"text": f"the word {i} is one of many"}) + "\n"
            for i in range(start, start + n)
        )
    )


def working_actors(started: bool = False) -> list[dict]:
    """Stats of the actors that did work in the jobs running now, read from each
    job's named stats sink (how a test finds what to kill mid-job); ``started``:
    also those whose first call is still running."""
    import ray

    from lmbatch.jobs.summary import SINK_PREFIX

    found = []
    key = "rows_started" if started else "rows"
    for named in ray.util.list_named_actors(all_namespaces=True):
        if not named["name"].startswith(SINK_PREFIX):
            continue
        try:  # an earlier job's sink, killed as it ended, may be listed a while
            sink = ray.get_actor(named["name"], namespace=named["namespace"])
            stats = ray.get(sink.snapshot.remote())
        except (ValueError, ray.exceptions.RayActorError):
            continue
        found += [a for a in stats if a[key] > 0]
    return found


def greedy(model, tok, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The tokens transformers' own greedy ``generate`` appends to ``ids`` (one text,
    alone and unpadded): what a generate job's row must continue with."""
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
        do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id,
    )  # fmt: skip
    return out[0, ids.shape[1] :]


def wide_classifier(
    tiny_models, path: Path, labels: int, token_types: bool = True
) -> str:
    """A BERT classifier of ``labels`` outputs beside the tiny BERT's tokenizer, its
    token-type embeddings and head drawn wide, so that each input, and each wrong
    token type, shows in the scores; its tokenizer gives no token types (as
    RoBERTa's) where ``token_types`` is False."""
    base = Path(tiny_models["bert_cls"])
    config = AutoConfig.from_pretrained(base)
    config.num_labels = labels
    if labels != 3:
        config.id2label = {i: f"LABEL_{i}" for i in range(labels)}
        config.label2id = {v: k for k, v in config.id2label.items()}
    torch.manual_seed(labels)
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():  # wide weights: a wrong token type shows in every score
        for weights in (model.bert.embeddings.token_type_embeddings, model.classifier):
            weights.weight.normal_(0, 1)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (base / name).exists():
            shutil.copy(base / name, path)
    if not token_types:
        settings = json.loads((path / "tokenizer_config.json").read_text())
        settings["model_input_names"] = ["input_ids", "attention_mask"]
        (path / "tokenizer_config.json").write_text(json.dumps(settings))
    return str(path)
