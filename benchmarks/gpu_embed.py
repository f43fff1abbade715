"""lmbatch on a GPU against what a user would pick instead, side by side.

- embed: ``lmbatch infer --task embed`` (actors per GPU from the model's footprint)
  against ``SentenceTransformer.encode(batch_size=256)`` in fp16, on all-MiniLM-L6-v2's
  and BERT-base's architecture, over the demo corpus cycled to ``--rows``.
- actors: the same lmbatch job alone, with each of ``--pool-sizes`` actors per GPU
  (default 1: host work overlapped inside one actor).
- ceiling: both tools on MiniLM without its layers, a model that costs nothing: the
  rows/s that reading, tokenizing, batching and writing allow on these cores.
- precision: lmbatch in int8 and nf4 against fp16, tokens/s and peak memory, on
  BERT-base (embed, ``--precision-rows``) and the 1B Llama (score, ``--llm-rows``).
- score, generate: lmbatch against a plain batched forward loop and a plain batched
  ``model.generate`` (1B Llama, ``--llm-rows`` rows, 32 new tokens).

Every run is its own process, timed whole (imports, start-up, reading, writing
Parquet). Per run: whole-process seconds, the job's own seconds, tokens/s, GPU-busy
(the actors' model time over the job time; above 1 when actors overlap on a GPU), the
mean GPU utilisation nvidia-smi saw, peak GPU memory and the GPU's name. Results are
appended to benchmarks/RESULTS.md with this command.

Models are directories (``../shared/gpu/make_models.py`` writes minilm, bertbase and
llama1b with random weights; both tools load the same weights).

Usage: python benchmarks/gpu_embed.py [--rows 1000000] [--models /tmp/models]
           [--only embed,actors,ceiling,precision,score,generate]
           [--embed-models minilm,bertbase] [--precision-models bertbase,llama1b]
           [--device cuda] [--pool-sizes 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common import (  # isort: skip
    append_results,
    corpus_rows,
    embedding_matrix,
    launcher,
    null_minilm,
)

PARTS = ("embed", "actors", "ceiling", "precision", "score", "generate")
ST_BATCH = 256
LLM_BATCH = 32
NEW_TOKENS = 32
HALF = {"cuda": "fp16", "cpu": "fp32"}  # fp16 on CPU is slow; a CPU run smoke-tests


class GpuSampler:
    """nvidia-smi's utilisation and memory, sampled while a run goes on."""

    def __init__(self) -> None:
        self.util: list[float] = []
        self.memory: list[float] = []
        self._proc = None

    def __enter__(self) -> GpuSampler:
        try:
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "250",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
        except FileNotFoundError:
            return self
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            util, used = (float(x) for x in line.split(",")[:2])
            self.util.append(util)
            self.memory.append(used * 2**20)

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()


def timed(cmd: list[str]) -> dict:
    """Run ``cmd``; whole-process seconds and what the GPU did meanwhile."""
    started = time.perf_counter()
    with GpuSampler() as gpu:
        done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        output = done.stdout[-3000:] + done.stderr[-3000:]
        raise SystemExit(f"{cmd[:3]} failed:\n{output}")
    return {
        "process_s": seconds,
        "util": float(np.mean(gpu.util)) if gpu.util else None,
        "gpu_peak": max(gpu.memory, default=0.0),
        "stdout": done.stdout,
    }


def lmbatch(model: str, inp: Path, out: Path, task: str, precision: str,
            device: str, **flags) -> dict:  # fmt: skip
    exe = launcher()
    cmd = [exe, "infer", "--model", model, "--input", str(inp), "--task", task,
           "--id-column", "row", "--output", str(out), "--overwrite",
           "--precision", precision, "--device", device]  # fmt: skip
    for flag, value in flags.items():
        cmd += [f"--{flag.replace('_', '-')}", str(value)]
    result = timed(cmd)
    # The job's own summary (start-up, stages, each actor) goes to the log, not to
    # RESULTS.md: it is what explains a run's figures.
    print(result["stdout"].rstrip(), flush=True)
    summary = json.loads((out / "_summary.json").read_text())
    actors = summary["actors"]
    model_s = sum(a["device_seconds"] for a in actors)
    return {
        **result,
        "job_s": summary["seconds"],
        "tokens": summary["tokens"],
        "busy": model_s / summary["seconds"],
        "alloc_peak": max(a["peak_memory_bytes"] for a in actors),
        "actors": len(actors),
        "ran": "; ".join(summary["ran"]),
        "where": where(summary),
    }


def where(summary: dict) -> str:
    """Where an lmbatch job's time went, from its ``_summary.json``: each stage as the
    summary prints it, and the actors' time in their calls against their model time."""
    from lmbatch.jobs.stages import Stage

    stages = [Stage(**s).describe(summary["seconds"]) for s in summary["stages"]]
    calls = sum(a["busy_seconds"] for a in summary["actors"])
    model = sum(a["device_seconds"] for a in summary["actors"])
    return (f"stages {'; '.join(stages) or '-'}; actors in calls {calls:.1f}s, "
            f"model {model:.1f}s")  # fmt: skip


def baseline(kind: str, model: str, inp: Path, out: Path, device: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, model, str(inp), str(out), device]
    result = timed(cmd)
    return {**result, **json.loads(result["stdout"].strip().splitlines()[-1])}


def child(kind: str, model: str, inp: str, out: str, device: str) -> None:
    """A baseline in this process: prints its own JSON line (model seconds, peak)."""
    import torch

    table = pq.read_table(inp)
    texts = table["text"].to_pylist()
    dtype = torch.float16 if device == "cuda" else torch.float32
    started = time.perf_counter()
    if kind == "st":
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(model, device=device, model_kwargs={"dtype": dtype})
        vectors = st.encode(texts, batch_size=ST_BATCH, normalize_embeddings=True)
        column = pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.astype(np.float32).reshape(-1)), vectors.shape[1]
        )
        os.makedirs(out, exist_ok=True)
        pq.write_table(pa.table({"id": table["row"], "embedding": column}),
                       f"{out}/part-0.parquet")  # fmt: skip
    else:
        llm_loop(kind, model, texts, device, dtype)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    print(json.dumps({"model_s": time.perf_counter() - started, "alloc_peak": peak}))


def llm_loop(kind: str, model_dir: str, texts: list[str], device: str, dtype) -> None:
    """What a user writes by hand: batches of 32, padded, a forward pass scoring each
    text (score) or ``model.generate`` (generate)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "left" if kind == "generate" else "right"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    with torch.inference_mode():
        for i in range(0, len(texts), LLM_BATCH):
            enc = tok(texts[i : i + LLM_BATCH], padding=True, truncation=True,
                      max_length=512, return_token_type_ids=False,
                      return_tensors="pt").to(device)  # fmt: skip
            if kind == "generate":
                model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False,
                               pad_token_id=tok.pad_token_id)  # fmt: skip
                continue
            logits = model(**enc).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(
                -1, enc["input_ids"][:, 1:, None]
            )
            (logp.squeeze(-1) * enc["attention_mask"][:, 1:]).sum(1).cpu()


def cosine(a: Path, b: Path) -> float:
    ids_a, x = embedding_matrix(a)
    ids_b, y = embedding_matrix(b)
    assert ids_a == ids_b, "lost or duplicated rows"
    return float((x * y).sum(1).mean())


def row(name: str, r: dict, base: dict | None, tokens: int | None = None) -> str:
    tokens = tokens or r.get("tokens")
    job = r.get("job_s") or r.get("model_s")
    ratio = f"{base['process_s'] / r['process_s']:.2f}" if base else "-"
    busy = f"{r['busy']:.2f}" if "busy" in r else "-"
    util = f"{r['util']:.0f}%" if r.get("util") is not None else "-"
    peak = max(r.get("alloc_peak", 0), r.get("gpu_peak", 0)) / 2**30
    ran = r.get("ran", "-")
    return (f"| {name} | {r['process_s']:.1f} | {job:.1f} | {tokens / job:,.0f} "
            f"| {ratio} | {busy} | {util} | {peak:.1f} | {ran} |")  # fmt: skip


HEADER = [
    "| run | whole process s | job s | tokens/s (job) | × baseline (whole) "
    "| GPU busy | nvidia-smi util | peak GiB | ran on |",
    "|---|---|---|---|---|---|---|---|---|",
]


def show(line: str) -> str:
    """A run's line, printed as soon as it ends: a run cut off by a time limit keeps
    the lines before it in its log."""
    print(line, flush=True)
    return line


def embed_part(models: Path, names: list[str], rows: int, device: str, tmp: Path,
               done: dict) -> list[str]:  # fmt: skip
    """lmbatch with actors per GPU from the footprint, then sentence-transformers."""
    inp = corpus(tmp, rows)
    half = HALF[device]
    lines = []
    for name in names:
        model = str(models / name)
        auto = lmbatch(model, inp, tmp / f"lm-{name}", "embed", half, device)
        st = baseline("st", model, inp, tmp / f"st-{name}", device)
        done[name] = st
        agree = cosine(tmp / f"lm-{name}", tmp / f"st-{name}")
        lines += [f"**{name}**, {rows:,} rows, {half}, mean cosine to ST {agree:.6f}",
                  "", *HEADER,
                  show(row(f"sentence-transformers encode({ST_BATCH})", st, st,
                           auto["tokens"])),
                  show(row(f"lmbatch, {auto['actors']} actors/GPU (auto)", auto, st)),
                  "", show(auto["where"]), ""]  # fmt: skip
    return lines


def actors_part(models: Path, names: list[str], rows: int, device: str, tmp: Path,
                done: dict, sizes: list[str]) -> list[str]:  # fmt: skip
    """lmbatch alone with each of ``sizes`` actors per GPU (1: host work overlapped
    inside one actor; auto: from the footprint), against embed's ST run if any."""
    inp = corpus(tmp, rows)
    lines = []
    for name in names:
        st = done.get(name)  # embed's ST run, when this process ran it
        lines += [f"**{name}**, {rows:,} rows, {HALF[device]}", "", *HEADER]
        wheres = []
        for size in sizes:
            run = lmbatch(str(models / name), inp, tmp / f"lm{size}-{name}", "embed",
                          HALF[device], device, actors_per_gpu=size)  # fmt: skip
            lines.append(show(row(f"lmbatch, {run['actors']} actors/GPU ({size})",
                                  run, st)))  # fmt: skip
            wheres.append(show(f"{size}: {run['where']}"))
        lines += ["", *wheres, ""]
    return lines


def corpus(tmp: Path, rows: int) -> Path:
    path = tmp / f"rows-{rows}.parquet"
    if not path.exists():
        corpus_rows(rows, path)
    return path


def ceiling_part(models: Path, rows: int, device: str, tmp: Path) -> list[str]:
    """Both tools on MiniLM with no transformer layers (its tokenizer, embeddings,
    pooling and normalisation): what each moves when the model costs nothing. For
    lmbatch that is reading, the tokenize tasks, Ray Data, the actors' host work and
    writing Parquet; the most rows/s any model can reach on these cores."""
    inp = corpus(tmp, rows)
    model = null_minilm(models, tmp)
    half = HALF[device]
    ours = lmbatch(model, inp, tmp / "null-lm", "embed", half, device)
    st = baseline("st", model, inp, tmp / "null-st", device)
    agree = cosine(tmp / "null-lm", tmp / "null-st")
    rate = {name: rows / r["process_s"] for name, r in (("st", st), ("lm", ours))}
    return [f"**MiniLM without its layers**, {rows:,} rows, {half}, mean cosine to ST "
            f"{agree:.6f}; rows/s whole process: lmbatch {rate['lm']:,.0f}, "
            f"sentence-transformers {rate['st']:,.0f}", "", *HEADER,
            show(row(f"sentence-transformers encode({ST_BATCH})", st, st,
                     ours["tokens"])),
            show(row(f"lmbatch, {ours['actors']} actors", ours, st)), "",
            show(ours["where"]), ""]  # fmt: skip


def precision_part(models: Path, names: list[str], rows: dict[str, int],
                   device: str, tmp: Path) -> list[str]:  # fmt: skip
    """int8 and nf4 against the half-precision run, per model (BERT-base embeds,
    the 1B Llama scores)."""
    lines = []
    for name in names:
        task = "score" if name.startswith("llama") else "embed"
        inp = corpus(tmp, rows[task])
        precisions = (HALF[device], "int8", "nf4")
        lines += [f"**{name}** ({task}), {rows[task]:,} rows", "", *HEADER]
        first = None
        for p in precisions:
            r = lmbatch(str(models / name), inp, tmp / f"p-{name}-{p}", task, p, device)
            first = first or r
            lines.append(show(row(f"lmbatch {p}", r, first)))
        lines.append("")
    return lines


def llm_part(kind: str, models: Path, rows: int, device: str, tmp: Path) -> list:
    inp = corpus(tmp, rows)
    model = str(models / "llama1b")
    base = baseline(kind, model, inp, tmp / f"b-{kind}", device)
    flags = {"max_new_tokens": NEW_TOKENS} if kind == "generate" else {}
    ours = lmbatch(model, inp, tmp / f"l-{kind}", kind, HALF[device], device, **flags)
    what = "batched model.generate" if kind == "generate" else "batched forward loop"
    return [f"**llama1b {kind}**, {rows:,} rows, {HALF[device]}", "", *HEADER,
            show(row(f"plain {what} ({LLM_BATCH})", base, base, ours["tokens"])),
            show(row("lmbatch", ours, base)), "", show(ours["where"]), ""]  # fmt: skip


def gpu_name(device: str) -> str:
    if device != "cuda":
        return "CPU"  # append_results adds the core count
    import torch

    return torch.cuda.get_device_name()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--llm-rows", type=int, default=4000)
    parser.add_argument("--precision-rows", type=int, default=100_000,
                        help="rows BERT-base embeds in each precision")  # fmt: skip
    parser.add_argument("--models", type=Path, default=Path("/tmp/models"))
    parser.add_argument("--only", default=",".join(PARTS))
    parser.add_argument("--embed-models", default="minilm,bertbase")
    parser.add_argument("--precision-models", default="bertbase,llama1b")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--pool-sizes", default="1",
                        help="actors a GPU in the actors part: auto,2,1")  # fmt: skip
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    parts = args.only.split(",")
    if unknown := set(parts) - set(PARTS):
        raise SystemExit(f"--only: unknown part {sorted(unknown)}; use {PARTS}")
    embed_models = args.embed_models.split(",")
    done: dict = {}  # model -> embed's ST run, which actors compares against
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Each part is recorded as soon as it ends, each run's line printed as soon as
        # it ends: a GPU machine's time is short, and a run cut off by its time limit
        # keeps what it finished.
        for part in parts:
            if part == "embed":
                lines = embed_part(args.models, embed_models, args.rows, args.device,
                                   tmp, done)  # fmt: skip
            elif part == "actors":
                lines = actors_part(args.models, embed_models, args.rows, args.device,
                                    tmp, done, args.pool_sizes.split(","))  # fmt: skip
            elif part == "ceiling":
                lines = ceiling_part(args.models, args.rows, args.device, tmp)
            elif part == "precision":
                rows = {"embed": args.precision_rows, "score": args.llm_rows}
                names = args.precision_models.split(",")
                lines = precision_part(args.models, names, rows, args.device, tmp)
            else:
                lines = llm_part(part, args.models, args.llm_rows, args.device, tmp)
            append_results(f"gpu_embed {part} on {gpu_name(args.device)}", lines)


if __name__ == "__main__":
    main()
