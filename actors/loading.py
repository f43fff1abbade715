"""``load_model``: the one place a model is loaded, for every task and precision.

``inspect_model`` reads only configs, so that the driver can refuse a bad model
directory, or a task the model cannot do, before any actor starts. ``load_model`` runs
inside each actor. Weights are safetensors only unless the user allows pickles, and
``trust_remote_code`` stays off unless asked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from actors.errors import UserError

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
# int8: bitsandbytes LLM.int8; nf4: bitsandbytes 4-bit NormalFloat, double quantised;
# cpu-int8: torch's dynamic int8 Linear (fbgemm/onednn), the int8 that is fast on a CPU.
PRECISIONS = (*FLOAT_DTYPES, "int8", "nf4", "cpu-int8")
TASK_MODEL_CLASSES = {
    "embed": AutoModel,
    "score": AutoModelForCausalLM,
    "generate": AutoModelForCausalLM,
    "classify": AutoModelForSequenceClassification,
}
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# Modules kept in full precision by every quantised load: the output heads, whose errors
# reach the result directly, and poolers.
SKIP_QUANTIZE = ["lm_head", "classifier", "score", "pooler"]
NF4_CPU_BLOCK = 64  # input features bitsandbytes' 4-bit CPU kernels pack together


@dataclass(frozen=True)
class ModelSpec:
    """How to hold a model: what the actor needs to call ``load_model``."""

    path: str
    task: str
    precision: str = "fp32"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    int8_threshold: float = 6.0  # LLM.int8 outlier threshold; 0 turns outliers off


@dataclass(frozen=True)
class Pooling:
    """Sentence embedding settings; sentence-transformers' own if the model has any."""

    mode: str = "mean"  # mean | cls | max | lasttoken
    normalize: bool = True
    max_seq_length: int | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What the driver learns from configs alone."""

    architectures: tuple[str, ...]
    max_positions: int | None
    pooling: Pooling
    id2label: dict[int, str] = field(default_factory=dict)


def inspect_model(
    path: str, task: str, trust_remote_code: bool = False, allow_pickle: bool = False
) -> ModelInfo:
    """Check that ``path`` is a model directory fit for ``task``, from configs only.

    Raises:
        UserError: naming ``--model`` or ``--task``.
    """
    config = _config(path, trust_remote_code)
    arch = tuple(config.architectures or ())
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
    _check_weights(Path(path), allow_pickle)
    return ModelInfo(
        architectures=arch,
        max_positions=_max_positions(config),
        pooling=sentence_pooling(Path(path)),
        id2label={int(k): v for k, v in (config.id2label or {}).items()},
    )


def load_model(spec: ModelSpec, device: str = "cpu") -> PreTrainedModel:
    """Load ``spec.path`` for ``spec.task`` at ``spec.precision`` on ``device``.

    Raises:
        UserError: naming ``--precision`` or ``--model``.
    """
    check_precision(spec.precision)
    if spec.precision == "cpu-int8" and device != "cpu":
        raise UserError(
            "--precision", "cpu-int8 runs on CPU only; use int8 or nf4 on a GPU"
        )
    _check_weights(Path(spec.path), spec.allow_pickle)
    spec, skip, artifact = _artifact_spec(spec)
    cls = TASK_MODEL_CLASSES[spec.task]
    if artifact is not None and (artifact.rebuild or artifact.sparse):
        return _load_rebuilt(spec, cls, artifact, device)
    kwargs = dict(
        trust_remote_code=spec.trust_remote_code,
        use_safetensors=None if spec.allow_pickle else True,  # None: whichever is there
    )
    if spec.precision in FLOAT_DTYPES:
        model = cls.from_pretrained(
            spec.path, dtype=FLOAT_DTYPES[spec.precision], **kwargs
        )
        model = model.to(device)
    elif spec.precision == "cpu-int8":
        model = quantize_dynamic_int8(
            cls.from_pretrained(spec.path, dtype=torch.float32, **kwargs)
        )
    else:
        model = cls.from_pretrained(
            spec.path,
            quantization_config=bnb_config(
                spec, device, [*skip, *_unpackable_linears(cls, spec, device)]
            ),
            # bitsandbytes computes in fp32 on CPU (give it explicitly), fp16 on GPU.
            dtype=torch.float32 if device == "cpu" else torch.float16,
            device_map={"": device},
            **kwargs,
        )
    return model.eval()


def _artifact_spec(spec: ModelSpec):
    """An lmbatch artifact carries its precision: ``--precision`` may only repeat it,
    or pick one for an artifact saved in fp32. Returns (spec, bnb skips, meta)."""
    from optimize.artifact import ArtifactMeta

    meta = ArtifactMeta.read(spec.path)
    if meta is None or meta.precision == "fp32":
        return spec, [], meta
    if spec.precision not in ("fp32", meta.precision):
        raise UserError(
            "--precision",
            f"{spec.path} is an artifact already in {meta.precision}; "
            "leave --precision out",
        )
    q = meta.quantization or {}
    precision = "fp32" if meta.precision == "mixed" else meta.precision
    spec = replace(
        spec,
        precision=precision,
        int8_threshold=q.get("int8_threshold", spec.int8_threshold),
    )
    return spec, list(q.get("skip", [])), meta


def _load_rebuilt(spec: ModelSpec, cls, artifact, device: str) -> PreTrainedModel:
    """An artifact with lmbatch's own modules (low-rank, shared, int8, pruned heads)."""
    from optimize.artifact import load_artifact

    if spec.precision in ("int8", "nf4"):
        raise UserError(
            "--precision",
            f"{spec.precision} cannot be applied to {spec.path}: its lmbatch modules "
            "are not bitsandbytes layers; use fp32, fp16, bf16 or cpu-int8",
        )
    dtype = None if spec.precision == "fp32" else FLOAT_DTYPES.get(spec.precision)
    model = load_artifact(spec.path, cls, artifact, dtype)
    if spec.precision == "cpu-int8":
        model = quantize_dynamic_int8(model)
    return model.to(device).eval()


def check_precision(precision: str) -> None:
    """Raises: UserError naming ``--precision`` when it is not one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise UserError(
            "--precision", f"unknown {precision!r}; use {', '.join(PRECISIONS)}"
        )


def bnb_config(spec: ModelSpec, device: str, skip: list[str]) -> BitsAndBytesConfig:
    """LLM.int8, or NF4 double-quantised; heads, poolers and ``skip`` stay full."""
    compute = torch.float32 if device == "cpu" else torch.float16
    if spec.precision == "int8":
        return BitsAndBytesConfig(
            load_in_8bit=True,
            llm_int8_threshold=spec.int8_threshold,
            llm_int8_skip_modules=[*SKIP_QUANTIZE, *skip],
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        llm_int8_skip_modules=[*SKIP_QUANTIZE, *skip],
    )


def _unpackable_linears(cls, spec: ModelSpec, device: str) -> list[str]:
    """Linears that bitsandbytes' 4-bit CPU kernels cannot pack: their input width is
    not a multiple of its 64-wide blocks. Kept in full precision rather than crashing
    at the first forward. Read off a weightless skeleton on the meta device."""
    if spec.precision != "nf4" or device != "cpu":
        return []
    config = AutoConfig.from_pretrained(
        spec.path, trust_remote_code=spec.trust_remote_code
    )
    with torch.device("meta"):
        skeleton = cls.from_config(config, trust_remote_code=spec.trust_remote_code)
    return [
        name
        for name, module in skeleton.named_modules()
        if isinstance(module, torch.nn.Linear) and module.in_features % NF4_CPU_BLOCK
    ]


def quantize_dynamic_int8(model: PreTrainedModel) -> PreTrainedModel:
    """Every Linear but the heads to dynamic int8 (fbgemm/onednn kernels).

    Deprecated in torch in favour of torchao, whose int8 kernels want
    ``torch.compile`` on CPU; this eager path is the one that runs faster than fp32 here
    (benchmarks/RESULTS.md, precision table).
    """
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    keep = {n for n, _ in model.named_modules() if any(s in n for s in SKIP_QUANTIZE)}
    targets = {
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n not in keep
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Per output channel weight scales: per-tensor ones cost MiniLM 0.06 of cosine.
        qconfig = dict.fromkeys(targets, per_channel_dynamic_qconfig)
        return quantize_dynamic(model, qconfig, dtype=torch.qint8)


@lru_cache(maxsize=4)
def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (GPT-2 style models have none)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise UserError(
            "--model", f"no usable tokenizer in {path}: {str(e).splitlines()[0]}"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def sentence_pooling(path: Path) -> Pooling:
    """Pooling, normalisation and max length from a sentence-transformers directory.

    A plain transformers directory gets mean pooling, L2-normalised: what
    sentence-transformers itself does for a model it does not know.
    """
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return Pooling()
    modules = json.loads(modules_file.read_text())
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
    mode = "mean"
    for m in modules:
        if m.get("type", "").endswith("Pooling"):
            pooling_config = json.loads((path / m["path"] / "config.json").read_text())
            mode = _pooling_mode(pooling_config)
    st_file = path / "sentence_bert_config.json"
    max_len = (
        json.loads(st_file.read_text()).get("max_seq_length")
        if st_file.is_file()
        else None
    )
    return Pooling(mode=mode, normalize=normalize, max_seq_length=max_len)


def _pooling_mode(config: dict) -> str:
    if config.get("pooling_mode"):
        return str(config["pooling_mode"])
    for mode in ("cls_token", "max_tokens", "lasttoken", "mean_tokens"):
        if config.get(f"pooling_mode_{mode}"):
            return {"cls_token": "cls", "max_tokens": "max", "mean_tokens": "mean"}.get(
                mode, mode
            )
    return "mean"


def _config(path: str, trust_remote_code: bool) -> PretrainedConfig:
    if not Path(path).is_dir():
        raise UserError("--model", f"not a directory: {path}")
    if not (Path(path) / "config.json").is_file():
        raise UserError("--model", f"{path} is not a model directory (no config.json)")
    auto_map = json.loads((Path(path) / "config.json").read_text()).get("auto_map")
    if auto_map and not trust_remote_code:
        raise UserError(
            "--trust-remote-code",
            f"{path} brings its own model code ({', '.join(sorted(auto_map))}); "
            "read it, then pass --trust-remote-code to run it",
        )
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            "--model", f"cannot read {path}/config.json: {str(e).splitlines()[0]}"
        ) from None


def _check_weights(path: Path, allow_pickle: bool) -> None:
    if any(path.glob("*.safetensors")):
        return
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        if allow_pickle:
            return
        raise UserError(
            "--model",
            f"{path} has only pickle weights (*.bin); "
            "pass --allow-pickle to trust them",
        )
    raise UserError("--model", f"{path} has no weights (*.safetensors)")


def _max_positions(config: PretrainedConfig) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _name(arch: tuple[str, ...]) -> str:
    return (
        ", ".join(arch)
        if arch
        else "of unknown architecture (config.architectures is empty)"
    )
