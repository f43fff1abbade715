"""Job specs: what a user asked for, validated before Ray starts.

``InferSpec``, ``ServeSpec`` and ``OptimizeSpec`` are pydantic models whose fields are
their commands' flags (``jobs/options.py``) and whose JSON is what a cluster
submission carries. Nothing here imports torch: the CLI builds its options from these
classes. ``prepare_infer`` checks an infer spec against the model directory, the
inputs and the output, and returns an ``InferPlan``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import pyarrow as pa
import pyarrow.fs as pafs
from pydantic import AfterValidator, Field, model_validator

from lmbatch.actors.footprint import footprint_precision, model_bytes
from lmbatch.actors.hub_cache import hub_snapshot
from lmbatch.actors.model_files import fetch_model
from lmbatch.actors.model_info import (
    CHAT_TASKS,
    CHUNK_TASKS,
    DEVICES,
    PAIR_TASKS,
    PRECISIONS,
    TASK_COLUMNS,
    TASKS,
    ModelInfo,
    check_runs_on_gpu,
    inspect_model,
    outcome_columns,
)
from lmbatch.actors.sampling import Sampling
from lmbatch.actors.sentence import EMBEDDING_PRECISIONS, Encoding, resolve_prompt
from lmbatch.actors.tokenize import (
    PIPELINE_COLUMNS,
    chat_text,
    check_tokenizers,
    load_tokenizer,
)
from lmbatch.errors import FieldError, UserError
from lmbatch.jobs.encodings import UTF8, check_encoding
from lmbatch.jobs.inputs import FORMATS, ResolvedInputs, no_column, resolve_inputs
from lmbatch.jobs.lease import check_no_writer
from lmbatch.jobs.options import (
    Flag,
    Spec,
    parse_auto_int,
    parse_columns,
    parse_range,
    parse_size,
)
from lmbatch.jobs.output import INFER_MARKERS, check_output

ON_LONG = ("truncate", "error", "chunk")
OPTIMIZE_TASKS = ("embed", "score", "classify")
FORMAT_NAMES = tuple(FORMATS)
Count = Annotated[int, Field(ge=1)]
# --model: a hub id becomes its snapshot in this machine's hub cache, where the spec
# is made (before a submission makes local paths absolute).
ModelPath = Annotated[str, AfterValidator(hub_snapshot)]


class ModelFlags(Spec):
    """How to hold a model: the flags infer and serve share."""

    model: Annotated[
        ModelPath,
        Flag(path=True),
        Field(description="Model or artifact directory, URI, or a Hugging Face hub "
              "id in this machine's hub cache."),
    ]  # fmt: skip
    task: str  # each command narrows it to the tasks it runs
    precision: Literal[PRECISIONS] = Field(
        "auto",
        description="auto: bf16 on GPUs that have it, else fp16; fp32 on CPU; a "
        "model's own (an artifact's, bitsandbytes' stored int8/nf4) where it has one. "
        "int8/nf4: bitsandbytes; cpu-int8: torch dynamic int8, fast on CPU.",
    )
    device: Literal[DEVICES] = Field(
        "auto", description="auto: GPUs where the cluster has them, else CPU."
    )
    max_length: Count | None = Field(
        None, description="Max input tokens; default the model's."
    )
    trust_remote_code: bool = Field(
        False, description="Run the model directory's own code."
    )
    allow_pickle: bool = Field(False, description="Load pickle (*.bin) weights.")
    int8_threshold: float = Field(
        6.0, ge=0.0, description="LLM.int8 outlier threshold (--precision int8)."
    )
    on_long: Literal[ON_LONG] = Field(
        "truncate",
        description="A text longer than --max-length: cut; an error row; or read "
        "whole in windows of --max-length (--task embed and classify: the "
        "windows' vectors or label scores averaged by tokens; score: strided "
        "windows, every token scored once).",
    )
    chunk_overlap: Annotated[int, Field(ge=0)] | None = Field(
        None,
        description="--on-long chunk: tokens each window repeats from the end of "
        "the one before; default 0 for embed and classify, half a window for score.",
    )
    max_new_tokens: Count = Field(
        32, description="Tokens each text is continued by (--task generate)."
    )
    temperature: float = Field(
        0.0,
        ge=0.0,
        description="--task generate: sample each token at this temperature; 0, "
        "greedy. A row draws the same text in any batch and on a retry.",
    )
    top_k: Count | None = Field(
        None, description="--temperature: draw from the k likeliest tokens only."
    )
    top_p: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="--temperature: draw from the likeliest tokens whose "
        "probability reaches p (nucleus sampling).",
    )
    seed: int = Field(
        0, ge=0, description="--temperature: another seed draws other texts."
    )
    stop: tuple[str, ...] = Field(
        (),
        description="--task generate: end a text where it generates this string, "
        "left out of the text; repeatable (bash: --stop $'\\n' for a newline).",
    )
    prompt: str | None = Field(
        None,
        description="--task embed: text put before each text, as sentence-"
        "transformers' prompt (e.g. 'query: ').",
    )
    prompt_name: str | None = Field(
        None,
        description="--task embed: one of the model's own prompts "
        "(config_sentence_transformers.json); default its default_prompt_name.",
    )
    chat_template: bool = Field(
        False,
        description="--task generate, or score with --pair-column: each text is a "
        "user's message in the model's chat template, the assistant's turn begun "
        "(apply_chat_template); score scores the pair's text as the answer.",
    )
    system_prompt: str | None = Field(
        None,
        description="--chat-template: a system message put before each user's message.",
    )
    truncate_dim: Count | None = Field(
        None,
        description="--task embed: keep the first N dimensions of each embedding "
        "(a Matryoshka model's), as sentence-transformers' truncate_dim.",
    )
    normalize: bool = Field(
        False,
        description="--task embed: L2-normalise each embedding last (after "
        "--truncate-dim), as sentence-transformers' normalize_embeddings.",
    )
    embedding_precision: Literal[EMBEDDING_PRECISIONS] = Field(
        "float32",
        description="--task embed: binary or ubinary packs each dimension's sign "
        "into a bit (int8 or uint8 bytes, 32x smaller), after --normalize, as "
        "sentence-transformers' encode(precision=...).",
    )

    @model_validator(mode="after")
    def _needed_flags(self) -> ModelFlags:
        if self.system_prompt is not None and not self.chat_template:
            raise FieldError("system_prompt", "needs --chat-template")
        if "" in self.stop:
            raise FieldError("stop", "an empty string would stop every text at once")
        if not self.temperature:
            drawn = {"top_k": self.top_k, "top_p": self.top_p < 1.0 or None,
                     "seed": self.seed or None}  # fmt: skip
            for name, value in drawn.items():
                if value is not None:
                    raise FieldError(name, "needs --temperature above 0 (sampling)")
        self._check_overlap()
        return self

    def _check_overlap(self) -> None:
        overlap = self.chunk_overlap
        if overlap is None:
            return
        if self.on_long != "chunk":
            raise FieldError("chunk_overlap", "applies to --on-long chunk")
        if self.task == "score" and overlap < 1:
            raise FieldError(
                "chunk_overlap",
                "--task score needs at least 1: a window's first token is context "
                "only, so it must be one the window before scored",
            )
        if self.max_length is not None and overlap >= self.max_length:
            raise FieldError(
                "chunk_overlap",
                f"{overlap} tokens leave no new token in a window of --max-length "
                f"{self.max_length}",
            )

    def encoding(self) -> Encoding:
        """What embed does to each vector after the model's own modules."""
        return Encoding(self.truncate_dim, self.normalize, self.embedding_precision)

    def sampling(self) -> Sampling | None:
        """How generate draws its tokens; None: greedy."""
        if not self.temperature:
            return None
        return Sampling(self.temperature, self.top_k, self.top_p, self.seed)


class InferSpec(ModelFlags):
    """One offline inference job, as the user asked for it."""

    inputs: Annotated[
        tuple[str, ...],
        Field(min_length=1),
        Flag(name="--input", path=True),
        Field(description="File, glob, directory or URI; more may follow it: "
              "--input a.csv b.csv."),
    ]  # fmt: skip
    task: Literal[TASKS]
    output: Annotated[
        str,
        Flag(path=True),
        Field(description="Directory for the Parquet output and _summary.json."),
    ]
    text_column: str = "text"
    pair_column: str | None = Field(
        None,
        description="Each row a text pair, its text and this column's. classify: a "
        "cross-encoder's (query, passage), an NLI model's (premise, hypothesis); "
        "score: a context and the continuation scored after it.",
    )
    id_column: str | None = Field(
        None, description="Column of row ids; default <file>#<row>."
    )
    keep_columns: Annotated[
        tuple[str, ...],
        Flag(parse=parse_columns, metavar="COL[,COL...]|*"),
        Field(description="Input columns copied to the output unchanged (types "
              "kept; CSV columns are text); * for all of them."),
    ] = ()  # fmt: skip
    input_format: Literal[FORMAT_NAMES] | None = Field(
        None,
        description="Default: from the file suffix; JSONL, CSV and TSV may be "
        "compressed (.jsonl.gz, .csv.zst; .bz2, .lz4).",
    )
    input_encoding: Annotated[str, AfterValidator(check_encoding)] = Field(
        UTF8,
        description="Text encoding of CSV, TSV and JSONL inputs, e.g. cp1252 for "
        "a spreadsheet exported on Windows; Parquet's and Arrow's is UTF-8.",
    )
    actors: Annotated[
        tuple[Count, Count] | None,
        Flag(parse=parse_range, metavar="MIN[,MAX]"),
        Field(description="Actor pool size; default from the cluster's resources."),
    ] = None
    batch_rows: Count | None = Field(
        None,
        description="Rows handed to an actor per call; default 1,024 on CPU, "
        "8,192 on GPU.",
    )
    rows_per_file: Count = Field(
        50_000,
        description="At least this many rows per output file; "
        "each file is a --resume point.",
    )
    batch_tokens: Count | None = Field(
        None, description="Fix the micro-batch token budget instead of adapting it."
    )
    actor_memory: Annotated[
        Count | None,
        Flag(parse=parse_size, metavar="SIZE"),
        Field(description="Memory per CPU actor, e.g. 2GiB; its batches adapt to it."),
    ] = None
    gpus: Count | None = Field(
        None,
        description="GPUs the pool spreads over (--device cuda); default every GPU "
        "the cluster has now, or one that its autoscaler starts.",
    )
    actors_per_gpu: Annotated[
        Count | None,
        Flag(parse=parse_auto_int, metavar="auto|N"),
        Field(description="Default auto: from the model's footprint."),
    ] = None
    limit: Count | None = Field(
        None,
        description="Compute at most this many rows in this run, to try a job on a "
        "sample; the same command with --resume and no --limit does the rest.",
    )
    dry_run: bool = Field(
        False,
        description="Check everything and size the pool, then say what the job "
        "would do; run nothing, write nothing.",
    )
    overwrite: bool = Field(
        False, description="Replace an earlier lmbatch output in --output."
    )
    resume: bool = Field(
        False,
        description="Continue the job that wrote --output: finished rows are kept, "
        "not redone.",
    )
    verbose: bool = Field(
        False, description="Ray Data's own progress tables instead of one line."
    )

    @model_validator(mode="after")
    def _consistent(self) -> InferSpec:
        if self.resume and self.overwrite:
            raise FieldError("resume", "continues an output; --overwrite replaces it")
        if self.actors is not None and self.actors[0] > self.actors[1]:
            low, high = self.actors
            raise FieldError("actors", f"need MIN <= MAX, got {low},{high}")
        if self.pair_column is not None and self.task not in PAIR_TASKS:
            raise FieldError(
                "pair_column",
                f"applies to --task {either(PAIR_TASKS)}, not {self.task}",
            )
        if why := paired_with_itself(self.text_column, self.pair_column):
            raise FieldError("pair_column", why)
        if self.pair_column is not None and self.on_long == "chunk":
            cut = {
                "score": "a context too long is cut from the left, the continuation "
                "kept whole",
                "classify": "a pair too long is cut longest text first, as a "
                "cross-encoder reads it",
            }
            raise FieldError(
                "on_long",
                f"chunk reads a long text whole; with --pair-column {cut[self.task]}",
            )
        if self.chat_template and self.task == "score" and self.pair_column is None:
            raise FieldError(
                "chat_template",
                "with --task score scores an answer to each message: "
                "name its column with --pair-column",
            )
        return self


class ServeSpec(ModelFlags):
    """One endpoint, as the user asked for it."""

    task: Literal[TASKS]
    max_batch_size: Count = Field(
        32, description="Texts per model call, gathered across requests (@serve.batch)."
    )
    batch_wait_ms: float = Field(
        10.0, ge=0.0, description="How long a batch waits to fill."
    )
    replicas: Count = 1
    host: str = Field(
        "127.0.0.1",
        description="Interface to listen on; 0.0.0.0 exposes the model to the network.",
    )
    port: int = Field(8000, ge=1, le=65535)


def paired_with_itself(text_column: str, pair_column: str | None) -> str | None:
    """What is wrong with a text pair of one column twice (infer's and optimize's
    --pair-column), or None."""
    if pair_column is None or pair_column != text_column:
        return None
    return (
        f"{pair_column!r} is --text-column too: each text would be paired with itself"
    )


class OptimizeSpec(Spec):
    """One optimize job, as the user asked for it."""

    model: Annotated[
        ModelPath,
        Flag(path=True),
        Field(description="Hugging Face model directory, URI, or hub id in this "
              "machine's hub cache."),
    ]  # fmt: skip
    recipe: Annotated[
        str, Flag(path=True), Field(description="YAML recipe: a list of `steps`.")
    ]
    output: Annotated[
        str, Flag(path=True), Field(description="Directory for the artifact.")
    ]
    calibration: Annotated[
        tuple[str, ...],
        Flag(path=True),
        Field(description="Text for statistics, training and (a held-out share) "
              "evaluation."),
    ] = ()  # fmt: skip
    eval: Annotated[
        tuple[str, ...],
        Flag(path=True),
        Field(description="Held-out text for the metrics; default: a share of "
              "--calibration."),
    ] = ()  # fmt: skip
    text_column: str = "text"
    pair_column: str | None = Field(
        None,
        description="--task classify: each row is the pair (text, this column's "
        "text), as a cross-encoder or NLI model reads it (infer's --pair-column).",
    )
    task: Literal[OPTIMIZE_TASKS] | None = Field(
        None, description="Default: from the architecture (causal LM: score)."
    )
    max_rows: Count = Field(4096, description="Calibration rows read at most.")
    eval_rows: Count = 512
    input_encoding: Annotated[str, AfterValidator(check_encoding)] = Field(
        UTF8,
        description="Text encoding of --calibration and --eval CSV, TSV and JSONL "
        "files, e.g. cp1252; Parquet's and Arrow's is UTF-8.",
    )
    max_length: Count = Field(
        128, description="Tokens per calibration and evaluation row."
    )
    device: Literal[DEVICES] = Field(
        "auto",
        description="auto: a GPU where the cluster has or can get one, else CPU.",
    )
    allow_pickle: bool = Field(
        False,
        description="Load pickle (*.bin) weights of --model and of a distill "
        "student; the artifact holds safetensors only.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Run the model directory's own code (and a distill student's); "
        "the artifact keeps it, and infer needs the flag for it too.",
    )
    overwrite: bool = Field(
        False, description="Replace an earlier lmbatch output in --output."
    )


@dataclass(frozen=True)
class InferPlan:
    """A validated spec with everything learnt while checking it."""

    spec: InferSpec
    inputs: ResolvedInputs
    model: ModelInfo
    model_dir: str  # --model, or its weights-free copy on this machine (a URI)
    max_length: int
    output_fs: pafs.FileSystem
    output_path: str
    keep: dict[str, pa.DataType]  # --keep-columns and their types
    prompt: str = ""  # put before every text (embed; prompt_of)

    @property
    def columns(self) -> list[str]:
        """What each output row holds, in order (the predictor's ``_table``)."""
        spec = self.spec
        return [
            "id",
            *TASK_COLUMNS[spec.task],
            *outcome_columns(spec.on_long),
            *self.keep,
        ]


def prepare_infer(spec: InferSpec) -> InferPlan:
    """Check every flag against files and model; nothing is started or written.

    Raises:
        UserError: naming the flag at fault.
    """
    check_tokenizers()
    model_dir = fetch_model(spec.model, weights=False)
    info = inspect_model(
        model_dir, spec.task, spec.trust_remote_code, spec.allow_pickle, spec.precision
    )
    if spec.device == "cuda":
        check_runs_on_gpu(spec.model, spec.precision, info.cpu_only)
    inputs = resolve_inputs(
        list(spec.inputs),
        spec.input_format,
        spec.text_column,
        spec.id_column,
        spec.output,
        spec.pair_column,
        spec.input_encoding,
    )
    max_length = max_length_of(spec, info, spec.max_new_tokens)
    keep = kept_columns(spec, inputs.schema)
    output_fs, output_path = check_output(
        spec.output, spec.model, INFER_MARKERS, spec.overwrite, spec.resume
    )
    check_no_writer(output_fs, output_path, spec.output)
    check_task_flags(spec, info)
    check_actor_memory(spec, info, model_dir)
    check_tokenizer(spec, model_dir)
    return InferPlan(
        spec, inputs, info, model_dir, max_length, output_fs, output_path, keep,
        prompt_of(spec, info),
    )  # fmt: skip


def either(names: tuple[str, ...]) -> str:
    """("embed", "score", "classify") -> "embed, score or classify"."""
    return " or ".join([", ".join(names[:-1]), names[-1]] if names[:-1] else names)


def check_task_flags(spec: ModelFlags, info: ModelInfo) -> None:
    """The flags of one task, checked against the task asked for and the model.

    Raises:
        UserError: naming an embed flag (``--prompt``, ``--prompt-name``,
            ``--truncate-dim``, ``--normalize``, ``--embedding-precision``),
            ``--chat-template``, ``--temperature``, ``--stop``,
            ``--max-new-tokens`` or ``--on-long chunk`` on another task,
            ``--int8-threshold`` on another precision or a model stored in int8,
            more dimensions than the model's embeddings have, or a chat template
            the model lacks.
    """

    def given(name: str) -> bool | None:  # a flag with a default, set by the user
        return name in spec.model_fields_set or None

    if given("int8_threshold") and spec.precision != "int8":
        raise UserError(
            "--int8-threshold", f"applies to --precision int8, not {spec.precision}"
        )
    if given("int8_threshold") and info.precision == "int8":
        raise UserError(
            "--int8-threshold",
            f"{spec.model} holds int8 weights with the threshold they were "
            "quantised by; leave --int8-threshold out",
        )
    only = {
        ("embed",): {"--prompt": spec.prompt, "--prompt-name": spec.prompt_name,
                     "--truncate-dim": spec.truncate_dim,
                     "--normalize": spec.normalize or None,
                     "--embedding-precision":
                         spec.embedding_precision != "float32" or None},
        CHUNK_TASKS: {"--on-long chunk": spec.on_long == "chunk" or None},
        CHAT_TASKS: {"--chat-template": spec.chat_template or None},
        ("generate",): {"--temperature": spec.temperature or None,
                        "--stop": spec.stop or None,
                        "--max-new-tokens": given("max_new_tokens")},
    }  # fmt: skip
    for tasks, flags in only.items():
        for flag, value in flags.items():
            if value is not None and spec.task not in tasks:
                raise UserError(
                    flag, f"applies to --task {either(tasks)}, not {spec.task}"
                )
    width = info.sentence.width(info.hidden_size) if info.hidden_size else None
    if spec.truncate_dim is not None and width and spec.truncate_dim > width:
        raise UserError(
            "--truncate-dim",
            f"{spec.truncate_dim} is more than the model's {width} dimensions",
        )
    if spec.chat_template and not info.chat_template:
        raise UserError(
            "--chat-template",
            f"{spec.model} has no chat template (none in tokenizer_config.json, no "
            "chat_template.jinja)",
        )


def check_actor_memory(spec: InferSpec, info: ModelInfo, model_dir: str) -> None:
    """An ``--actor-memory`` that cannot hold the model's weights (``1KB`` for
    ``1GB``) would make every actor run each row alone over its limit, counted as an
    out-of-memory retry, and tell Ray to reserve nothing.

    Raises:
        UserError: naming ``--actor-memory``.
    """
    if spec.actor_memory is None:
        return
    if spec.device == "cuda":
        raise UserError(
            "--actor-memory",
            "applies to CPU actors; a GPU actor's batches fit its share of the GPU",
        )
    precision = footprint_precision(info.precision, spec.precision, "cpu")
    weights = model_bytes(model_dir, precision, "cpu")
    if spec.actor_memory <= weights:
        raise UserError(
            "--actor-memory",
            f"{_size(spec.actor_memory)} would not hold the model's weights alone "
            f"({_size(weights)} in {precision}), let alone Python, torch and a batch",
        )


def _size(n: int) -> str:
    return f"{n:,} bytes" if n < 2**20 else f"{n / 2**20:,.0f} MiB"


def check_tokenizer(spec: ModelFlags, model_dir: str) -> None:
    """What only the model's tokenizer can tell, before Ray starts rather than as an
    error in the job's tasks. It loads the tokenizer (transformers and torch, about
    2 s), for chat and ``--stop`` jobs only.

    Raises:
        UserError: naming ``--chat-template``, ``--system-prompt`` or ``--stop``.
    """
    if not (spec.chat_template or spec.stop):
        return
    tokenizer = load_tokenizer(model_dir, spec.trust_remote_code)
    if spec.chat_template:
        _check_chat(tokenizer, spec)
    if spec.stop:
        _check_stop(tokenizer, spec)


def _check_stop(tokenizer, spec: ModelFlags) -> None:
    """transformers' stop-string matcher, built as each actor builds it: it needs a
    tokenizer that can spell a plain word (a word-level one with no such word
    cannot)."""
    from lmbatch.actors.stopping import stop_strings

    try:
        stop_strings(tokenizer, spec.stop)
    except ValueError as e:
        raise UserError(
            "--stop",
            f"the tokenizer of {spec.model} cannot match stop strings "
            f"(transformers' StopStringCriteria: {e})",
        ) from None


def _check_chat(tokenizer, spec: ModelFlags) -> None:
    """One message rendered in the model's chat template, as the tokenize tasks will
    render every row, so that a template that fails, or refuses or drops the system
    message (Gemma's refuse one), is one line."""
    _rendered(tokenizer, spec, None, "--chat-template")
    if spec.system_prompt is None:
        return
    text = _rendered(tokenizer, spec, spec.system_prompt, "--system-prompt")
    if spec.system_prompt.strip() not in text:
        raise UserError(
            "--system-prompt",
            f"the chat template of {spec.model} leaves the system message out",
        )


def _rendered(tokenizer, spec: ModelFlags, system: str | None, flag: str) -> str:
    from jinja2 import TemplateError

    try:
        return chat_text(tokenizer, "Is this message rendered?", system)
    except (TemplateError, ValueError) as e:  # the template's raise_exception too
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            flag, f"the chat template of {spec.model} fails: {why}"
        ) from None


def prompt_of(spec: ModelFlags, info: ModelInfo) -> str:
    """The prompt put before every text: embed only, as sentence-transformers picks
    it (``resolve_prompt``)."""
    if spec.task != "embed":
        return ""
    return resolve_prompt(info.sentence, spec.prompt, spec.prompt_name)


def kept_columns(spec: InferSpec, schema: pa.Schema) -> dict[str, pa.DataType]:
    """``--keep-columns`` resolved against the first input file: name -> type.

    Raises:
        UserError: naming ``--keep-columns`` for a column the input lacks or the
            output already has.
    """
    names = schema.names if spec.keep_columns == ("*",) else spec.keep_columns
    taken = {
        *PIPELINE_COLUMNS,
        *TASK_COLUMNS[spec.task],
        *outcome_columns(spec.on_long),
    }
    for name in names:
        if name not in schema.names:
            raise UserError(
                "--keep-columns", no_column(name, "the input", schema.names)
            )
        if name in taken:
            raise UserError(
                "--keep-columns",
                f"{name!r} is a column of the output already (--task {spec.task})",
            )
    return {name: schema.field(name).type for name in names}


def max_length_of(spec: ModelFlags, info: ModelInfo, new_tokens: int = 0) -> int:
    """Max input tokens: the user's, else sentence-transformers', else the model's,
    less ``new_tokens`` where the task generates them."""
    limit = info.max_positions
    if spec.task == "generate" and limit is not None:
        limit -= new_tokens
        if limit < 1:
            raise UserError(
                "--max-new-tokens",
                f"{new_tokens} leaves no room for a prompt "
                f"in {info.max_positions} positions",
            )
    if spec.max_length is not None:
        if limit is not None and spec.max_length > limit:
            raise UserError(
                "--max-length",
                f"{spec.max_length} is more than the model's {limit} positions",
            )
        return spec.max_length
    st_limit = info.sentence.max_seq_length
    if spec.task == "embed" and st_limit:
        return min(st_limit, limit or st_limit)
    return limit or 512
