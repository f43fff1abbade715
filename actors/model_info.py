"""What the driver learns about a model from its files alone, before Ray starts.

Reads JSON (``config.json``, sentence-transformers' module files, an artifact's
``lmbatch.json``) and file names, nothing else: neither torch nor transformers is
imported here, so a bad ``--model``, ``--task`` or ``--precision`` is one line in a
fraction of a second, and the driver's heavy imports can overlap Ray's start-up.
``loading.load_model`` loads the weights, inside each actor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lmbatch.actors.artifact import ArtifactMeta, stored_precision
from lmbatch.actors.model_files import weight_names
from lmbatch.actors.sentence import Sentence, read_sentence
from lmbatch.errors import UserError

# auto: bf16 on GPUs that compute in it, fp16 on older ones, fp32 on CPU.
# int8: bitsandbytes LLM.int8; nf4: bitsandbytes 4-bit NormalFloat, double quantised;
# cpu-int8: torch's dynamic int8 Linear (fbgemm/onednn), the int8 that is fast on a CPU.
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8", "nf4", "cpu-int8")
CPU_ONLY_PRECISIONS = ("cpu-int8",)
TASKS = ("embed", "score", "classify", "generate")
# Tasks that read text pairs: classify (a cross-encoder's query and passage), score (a
# context and the continuation scored after it).
PAIR_TASKS = ("classify", "score")
# Tasks that can read each text as a user's message in a chat template: generate
# answers it; score scores a given answer to it (a text pair's second text).
CHAT_TASKS = ("generate", "score")
# Tasks that can read a long text whole (--on-long chunk): embed averages its windows'
# vectors, classify their label scores, score scores every token once in strided
# windows.
CHUNK_TASKS = ("embed", "score", "classify")
DEVICES = ("auto", "cuda", "cpu")  # auto: GPUs where the cluster has them
# What each task writes besides id and error (the heads' schemas, actors/tasks.py).
TASK_COLUMNS = {
    "embed": ("embedding",),
    "score": ("logprob", "num_tokens", "perplexity", "is_greedy"),
    "classify": ("label", "score", "probs"),
    "generate": ("generated_text", "finish_reason", "generated_tokens"),
}
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def outcome_columns(on_long: str) -> tuple[str, ...]:
    """What every row has after its task's columns (the predictor's ``_table``):
    its error; where the job truncates, whether the row lost tokens to
    --max-length; under --on-long chunk, how many windows it was read in."""
    per_mode = {"truncate": ("truncated",), "chunk": ("windows",)}
    return ("error", *per_mode.get(on_long, ()))


@dataclass(frozen=True)
class ModelSpec:
    """How to hold a model: what the actor needs to call ``load_model``."""

    path: str
    task: str
    precision: str = "fp32"  # as saved; the CLI's default is auto
    trust_remote_code: bool = False
    allow_pickle: bool = False
    int8_threshold: float = 6.0  # LLM.int8 outlier threshold; 0 turns outliers off


@dataclass(frozen=True)
class ModelInfo:
    """What the driver learns from configs alone."""

    architectures: tuple[str, ...]
    max_positions: int | None
    sentence: Sentence  # how token states become an embedding (embed)
    id2label: dict[int, str] = field(default_factory=dict)
    # classify: what turns logits into ``probs`` (classify_function)
    classify_function: str = "softmax"
    hidden_size: int | None = None  # config's width of a token state
    chat_template: bool = False  # generate, score: whether its tokenizer has one
    cpu_only: bool = False  # an artifact with layers on torch's int8 CPU kernels
    # The weights' own precision: an artifact's, or bitsandbytes' stored one; None:
    # --precision chooses.
    precision: str | None = None


def inspect_model(
    path: str,
    task: str,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    precision: str = "auto",
) -> ModelInfo:
    """Check that ``path`` is a model directory fit for ``task`` (and, an artifact,
    for ``precision``), from configs only.

    Raises:
        UserError: naming ``--model``, ``--task`` or ``--precision``.
    """
    config = _config(path, trust_remote_code)
    arch = tuple(config.get("architectures") or ())
    if task in ("score", "generate") and not any(
        a.endswith(CAUSAL_SUFFIXES) for a in arch
    ):
        raise UserError(
            "--task", f"{task} needs a causal language model; {path} is {_name(arch)}"
        )
    if task == "classify" and not any(
        a.endswith("ForSequenceClassification") for a in arch
    ):
        raise UserError(
            "--task",
            f"classify needs a sequence-classification model; {path} is {_name(arch)}",
        )
    check_weights(Path(path), allow_pickle)
    artifact = ArtifactMeta.read(path)
    if artifact is not None:
        artifact.check_precision(path, precision)
        own = artifact.precision
    else:
        own = stored_precision(path, precision)
    return ModelInfo(
        architectures=arch,
        max_positions=_max_positions(config),
        sentence=(
            read_sentence(Path(path), allow_pickle) if task == "embed" else Sentence()
        ),
        id2label=_id2label(config),
        classify_function=classify_function(config),
        hidden_size=_first_int(config, ("hidden_size", "d_model", "n_embd")),
        chat_template=task in CHAT_TASKS and has_chat_template(Path(path)),
        cpu_only=artifact is not None and artifact.cpu_only,
        precision=own,
    )


def check_precision(precision: str) -> None:
    """Raises: UserError naming ``--precision`` when it is not one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise UserError(
            "--precision", f"unknown {precision!r}; use {', '.join(PRECISIONS)}"
        )


def computes_in_fp16(precision: str, device: str) -> bool:
    """Whether an actor computes in fp16, whose range (65,504) some models overflow:
    fp16 itself, or int8 and nf4 on a GPU, where bitsandbytes computes in fp16.
    ``device`` is a device type or an actor's "cuda (NAME)"."""
    on_gpu = device.startswith("cuda")
    return precision == "fp16" or (precision in ("int8", "nf4") and on_gpu)


def check_runs_on_gpu(path: str, precision: str, cpu_only: bool = False) -> None:
    """Raises: UserError naming ``--precision`` or the artifact when what was asked
    for runs on CPU kernels only."""
    if precision in CPU_ONLY_PRECISIONS:
        raise UserError(
            "--precision",
            f"{precision} runs on CPU only; on a GPU use int8, nf4, fp16 or bf16, "
            "or run on CPU (--device cpu)",
        )
    if cpu_only:
        raise UserError(
            "--model",
            f"{path} holds int8 layers for torch's CPU kernels (a cpu-int8 "
            "artifact); run it on CPU (--device cpu)",
        )


def _config(path: str, trust_remote_code: bool) -> dict:
    """config.json as data; transformers reads it again, in the actor."""
    if not Path(path).is_dir():
        raise UserError("--model", f"not a directory: {path}")
    if not (Path(path) / "config.json").is_file():
        raise UserError("--model", f"{path} is not a model directory (no config.json)")
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(
            "--model", f"cannot read {path}/config.json: {str(e).splitlines()[0]}"
        ) from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError("--model", f"{path}/config.json names no model_type")
    auto_map = config.get("auto_map")
    if auto_map and not trust_remote_code:
        raise UserError(
            "--trust-remote-code",
            f"{path} brings its own model code ({', '.join(sorted(auto_map))}); "
            "read it, then pass --trust-remote-code to run it",
        )
    return config


def has_chat_template(path: Path) -> bool:
    """Whether the tokenizer has a chat template: in its own file (transformers 5
    saves ``chat_template.jinja``) or in tokenizer_config.json (older ones)."""
    if (path / "chat_template.jinja").is_file() or (
        path / "chat_template.json"
    ).is_file():
        return True
    try:
        config = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(config.get("chat_template"))


def classify_function(config: dict) -> str:
    """What turns a classifier's logits into its scores, as transformers'
    text-classification pipeline chooses: none for regression, sigmoid (each label on
    its own) for a multi-label model or one with a single output, else softmax."""
    problem = config.get("problem_type")
    if problem == "regression":
        return "none"
    labels = len(config.get("id2label") or {}) or int(config.get("num_labels", 2))
    if problem == "multi_label_classification" or labels == 1:
        return "sigmoid"
    return "softmax"


def _id2label(config: dict) -> dict[int, str]:
    """Label names by index; LABEL_i where none are given (transformers' names)."""
    given = config.get("id2label")
    if given:
        return {int(k): str(v) for k, v in given.items()}
    return {i: f"LABEL_{i}" for i in range(int(config.get("num_labels", 2)))}


def check_weights(path: Path, allow_pickle: bool) -> None:
    top = [name for name in weight_names(str(path)) if "/" not in name]
    if any(name.endswith(".safetensors") for name in top):
        return
    if any(name.endswith((".bin", ".pt")) for name in top):
        if allow_pickle:
            return
        raise UserError(
            "--model",
            f"{path} has only pickle weights (*.bin); "
            "pass --allow-pickle to trust them",
        )
    raise UserError("--model", f"{path} has no weights (*.safetensors)")


def _max_positions(config: dict) -> int | None:
    return _first_int(config, ("max_position_embeddings", "n_positions", "max_seq_len"))


def _first_int(config: dict, names: tuple[str, ...]) -> int | None:
    """The first of ``names`` the config gives as a positive integer."""
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _name(arch: tuple[str, ...]) -> str:
    return (
        ", ".join(arch)
        if arch
        else "of unknown architecture (config.architectures is empty)"
    )
