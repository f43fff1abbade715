"""Typed job specs, built from CLI flags and validated before Ray starts.

The same spec object is what a cluster submission will carry, so validation that needs
the files (``prepare_infer``) is kept apart from the plain data (``InferSpec``).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.fs as pafs

from actors.errors import UserError
from actors.model_info import (
    ModelInfo,
    check_precision,
    check_runs_on_gpu,
    inspect_model,
)
from jobs.inputs import ResolvedInputs, filesystem_of, resolve_inputs

TASKS = ("embed", "score", "classify", "generate")
ON_LONG = ("truncate", "error")
DEVICES = ("auto", "cuda", "cpu")


@dataclass(frozen=True)
class InferSpec:
    """One offline inference job, as the user asked for it."""

    model: str  # a Hugging Face model directory
    inputs: tuple[str, ...]  # files, globs, directories or URIs
    task: str  # embed | score | classify | generate
    output: str  # directory (or URI) for the Parquet dataset
    text_column: str = "text"
    id_column: str | None = None  # None: ids are <file>#<row>
    input_format: str | None = None  # None: from the file suffix
    max_length: int | None = None  # tokens; None: the model's own limit
    max_new_tokens: int = 32  # generate only
    actors: tuple[int, int] | None = None  # (min, max); None: sized from the cluster
    batch_rows: int | None = None  # rows per actor call; None: 1,024 CPU, 8,192 GPU
    rows_per_file: int = 50_000  # at least, per output file; each is a resume point
    batch_tokens: int | None = None  # fixed micro-batch budget; None adapts
    precision: str = "auto"  # auto | fp32 | fp16 | bf16 | int8 | nf4 | cpu-int8
    device: str = "auto"  # auto: GPUs where the cluster has them, else CPU
    int8_threshold: float = 6.0  # LLM.int8 outlier threshold (precision int8)
    actor_memory: int | None = None  # bytes per CPU actor; None: an equal node share
    actors_per_gpu: int | None = None  # None: from the model's measured footprint
    overwrite: bool = False
    resume: bool = False  # continue the job that wrote --output
    on_long: str = "truncate"  # truncate | error
    trust_remote_code: bool = False
    allow_pickle: bool = False


@dataclass(frozen=True)
class InferPlan:
    """A validated spec with everything learnt while checking it."""

    spec: InferSpec
    inputs: ResolvedInputs
    model: ModelInfo
    max_length: int
    output_fs: pafs.FileSystem
    output_path: str


def prepare_infer(spec: InferSpec) -> InferPlan:
    """Check every flag against files and model; nothing is started or written.

    Raises:
        UserError: naming the flag at fault.
    """
    _check_choices(spec)
    info = inspect_model(
        spec.model, spec.task, spec.trust_remote_code, spec.allow_pickle
    )
    if spec.device == "cuda":
        check_runs_on_gpu(spec.model, spec.precision, info.cpu_only)
    inputs = resolve_inputs(
        list(spec.inputs), spec.input_format, spec.text_column, spec.id_column
    )
    max_length = max_length_of(spec, info)
    output_fs, output_path = check_output(spec.output, spec.overwrite or spec.resume)
    return InferPlan(spec, inputs, info, max_length, output_fs, output_path)


def _check_choices(spec: InferSpec) -> None:
    if spec.task not in TASKS:
        raise UserError("--task", f"unknown task {spec.task!r}; use {', '.join(TASKS)}")
    check_precision(spec.precision)
    if spec.device not in DEVICES:
        raise UserError("--device", f"use {', '.join(DEVICES)}, not {spec.device!r}")
    if spec.on_long not in ON_LONG:
        raise UserError(
            "--on-long", f"use {' or '.join(ON_LONG)}, not {spec.on_long!r}"
        )
    for flag, value in (
        ("--batch-rows", spec.batch_rows),
        ("--rows-per-file", spec.rows_per_file),
        ("--max-new-tokens", spec.max_new_tokens),
        ("--batch-tokens", spec.batch_tokens),
        ("--max-length", spec.max_length),
        ("--actor-memory", spec.actor_memory),
        ("--actors-per-gpu", spec.actors_per_gpu),
    ):
        if value is not None and value < 1:
            raise UserError(flag, f"must be at least 1, got {value}")
    if spec.resume and spec.overwrite:
        raise UserError("--resume", "continues an output; --overwrite replaces it")
    if spec.int8_threshold < 0:
        raise UserError("--int8-threshold", f"must be >= 0, got {spec.int8_threshold}")
    if spec.actors is not None and not 1 <= spec.actors[0] <= spec.actors[1]:
        raise UserError(
            "--actors", f"need 1 <= MIN <= MAX, got {spec.actors[0]},{spec.actors[1]}"
        )


def max_length_of(spec: InferSpec, info: ModelInfo) -> int:
    """Max input tokens: the user's, else sentence-transformers', else the model's."""
    limit = info.max_positions
    if spec.task == "generate" and limit is not None:
        limit -= spec.max_new_tokens
        if limit < 1:
            raise UserError(
                "--max-new-tokens",
                f"{spec.max_new_tokens} leaves no room for a prompt "
                f"in {info.max_positions} positions",
            )
    if spec.max_length is not None:
        if limit is not None and spec.max_length > limit:
            raise UserError(
                "--max-length",
                f"{spec.max_length} is more than the model's {limit} positions",
            )
        return spec.max_length
    if spec.task == "embed" and info.pooling.max_seq_length:
        return min(info.pooling.max_seq_length, limit or info.pooling.max_seq_length)
    return limit or 512


def check_output(output: str, overwrite: bool) -> tuple[pafs.FileSystem, str]:
    """Refuse an output directory that holds files, unless ``--overwrite``."""
    fs, path = filesystem_of(output, "--output")
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise UserError("--output", f"{output} is a file; give a directory")
    if info.type == pafs.FileType.Directory and not overwrite:
        if fs.get_file_info(pafs.FileSelector(path, recursive=False)):
            raise UserError(
                "--output",
                f"{output} already holds files; pass --overwrite to replace them",
            )
    return fs, path
