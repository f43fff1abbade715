"""``load_model``: the one place a model is loaded, for every task and precision.

It runs inside each actor (and the optimize task); the driver checks the model from
its files alone first (``model_info.inspect_model``). Weights are safetensors only
unless the user allows pickles, and ``trust_remote_code`` stays off unless asked.
An lmbatch artifact is rebuilt here too (``load_artifact``), from the format
``artifact.py`` reads.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BitsAndBytesConfig,
    PreTrainedModel,
)
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from lmbatch.actors.artifact import META_FILE, ArtifactMeta, stored_precision
from lmbatch.actors.layers import conv1d_as_linear, rebuild, replace_module
from lmbatch.actors.model_files import fetch_model
from lmbatch.actors.model_info import (
    ModelSpec,
    check_precision,
    check_runs_on_gpu,
    check_weights,
)
from lmbatch.errors import UserError

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
TASK_MODEL_CLASSES = {
    "embed": AutoModel,
    "score": AutoModelForCausalLM,
    "generate": AutoModelForCausalLM,
    "classify": AutoModelForSequenceClassification,
}
# Modules kept in full precision by every quantised load: the output heads, whose errors
# reach the result directly, and poolers.
SKIP_QUANTIZE = ["lm_head", "classifier", "score", "pooler"]
NF4_CPU_BLOCK = 64  # input features bitsandbytes' 4-bit CPU kernels pack together
# Two warnings of bitsandbytes on CPU, about nothing a job can change: its 4-bit
# backend could not fetch a faster kernel from the Hugging Face hub (the `kernels`
# package; its own kernel runs instead, the one every CPU figure here was measured
# with), once per actor; and LLM.int8 casts fp32 inputs to fp16 before quantising
# them, once per layer per micro-batch: 360 lines for a 300-row MiniLM job.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


def load_model(spec: ModelSpec, device: str = "cpu") -> PreTrainedModel:
    """Load ``spec.path`` for ``spec.task`` at ``spec.precision`` on ``device``.

    Raises:
        UserError: naming ``--precision`` or ``--model``.
    """
    check_precision(spec.precision)
    # transformers' "Loading weights" bar: one per actor, interleaved on the driver's
    # console by Ray's log forwarding; the summary says how long each load took.
    hf_logging.disable_progress_bar()
    spec = replace(spec, path=fetch_model(spec.path))  # a URI: this node's copy
    check_weights(Path(spec.path), spec.allow_pickle)
    _check_config(spec)
    spec, skip, artifact = _artifact_spec(spec, device)
    if device != "cpu":
        cpu_only = artifact is not None and artifact.cpu_only
        check_runs_on_gpu(spec.path, spec.precision, cpu_only)
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
        model = _load_bitsandbytes(cls, spec, device, skip, kwargs)
    return model.eval()


def _load_bitsandbytes(
    cls, spec: ModelSpec, device: str, skip: list[str], kwargs: dict
) -> PreTrainedModel:
    """Quantised as it loads; or, where config.json says its weights are stored
    quantised already (an int8/nf4 artifact, a hub's ``*-bnb-4bit``), loaded as
    stored, computing in this device's dtype."""
    config = AutoConfig.from_pretrained(
        spec.path, trust_remote_code=spec.trust_remote_code
    )
    stored = getattr(config, "quantization_config", None)
    quantization = None
    if stored:
        config.quantization_config = {
            **stored,
            "bnb_4bit_compute_dtype": compute_dtype(device),
        }
    else:
        unpackable = _unpackable_linears(cls, spec, device)
        quantization = bnb_config(spec, device, [*skip, *unpackable])
    return cls.from_pretrained(
        spec.path,
        config=config,
        quantization_config=quantization,
        dtype=compute_dtype(device),
        device_map={"": device},
        **kwargs,
    )


def compute_dtype(device: str) -> torch.dtype:
    """What bitsandbytes computes in, and holds its unquantised tensors in: fp32 on
    CPU (given explicitly), fp16 on GPU."""
    return torch.float32 if device == "cpu" else torch.float16


def _check_config(spec: ModelSpec) -> None:
    """What transformers alone can tell of config.json (an unknown model_type, say),
    as one line naming --model rather than a traceback from inside an actor."""
    try:
        AutoConfig.from_pretrained(spec.path, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            "--model", f"cannot read {spec.path}/config.json: {str(e).splitlines()[0]}"
        ) from None


def ran_precision(spec: ModelSpec, device: str) -> str:
    """What ``load_model(spec, device)`` holds the weights in: ``auto`` and an
    artifact's own precision made concrete, for the summary."""
    local = replace(spec, path=fetch_model(spec.path))
    concrete, _, artifact = _artifact_spec(local, device)
    mixed = artifact is not None and artifact.precision == "mixed"
    return "mixed" if mixed else concrete.precision


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` made concrete for ``device``: bf16 on GPUs with bf16 tensor cores
    (compute capability 8.0, Ampere, and later), fp16 on older GPUs, fp32 on CPU."""
    if precision != "auto":
        return precision
    if device == "cpu":
        return "fp32"
    major, _ = torch.cuda.get_device_capability(torch.device(device))
    return "bf16" if major >= 8 else "fp16"


def _artifact_spec(spec: ModelSpec, device: str):
    """An lmbatch artifact carries its precision, as a checkpoint bitsandbytes
    stored does: ``--precision`` may only repeat it, or pick one for an artifact
    saved in fp32; ``auto`` (and fp32, what ``ModelSpec`` means by "as saved") take
    the model's own.
    Returns (spec with a concrete precision, bnb skips, meta)."""
    meta = ArtifactMeta.read(spec.path)
    if meta is not None:
        meta.check_precision(spec.path, spec.precision)
    elif stored := stored_precision(spec.path, spec.precision):
        return replace(spec, precision=stored), [], None
    if meta is None or meta.precision == "fp32":
        precision = resolve_precision(spec.precision, device)
        return replace(spec, precision=precision), [], meta
    q = meta.quantization or {}
    precision = "fp32" if meta.precision == "mixed" else meta.precision
    spec = replace(
        spec,
        precision=precision,
        int8_threshold=q.get("int8_threshold", spec.int8_threshold),
    )
    return spec, list(q.get("skip", [])), meta


def _load_rebuilt(spec: ModelSpec, cls, artifact, device: str) -> PreTrainedModel:
    """An artifact with lmbatch's own modules (low-rank, shared, int8, pruned heads);
    ``ArtifactMeta.check_precision`` has refused bitsandbytes for it."""
    dtype = None if spec.precision == "fp32" else FLOAT_DTYPES.get(spec.precision)
    model = load_artifact(spec.path, cls, artifact, dtype, spec.trust_remote_code)
    if spec.precision == "cpu-int8":
        model = quantize_dynamic_int8(model)
    return model.to(device).eval()


def bnb_config(spec: ModelSpec, device: str, skip: list[str]) -> BitsAndBytesConfig:
    """LLM.int8, or NF4 double-quantised; heads, poolers and ``skip`` stay full."""
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
        bnb_4bit_compute_dtype=compute_dtype(device),
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
        if _in_features(module) % NF4_CPU_BLOCK
    ]


def _in_features(module: torch.nn.Module) -> int:
    """A Linear's input width, GPT-2's transposed ``Conv1D``'s too (bitsandbytes
    quantises both); 0 for any other module."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features
    return module.nx if isinstance(module, Conv1D) else 0


def quantize_dynamic_int8(model: PreTrainedModel) -> PreTrainedModel:
    """Every Linear (GPT-2's Conv1D too) but the heads to dynamic int8
    (fbgemm/onednn kernels).

    Deprecated in torch in favour of torchao, whose int8 kernels want
    ``torch.compile`` on CPU; this eager path is the one that runs faster than fp32 here
    (benchmarks/RESULTS.md, precision table).
    """
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    conv1d_as_linear(model)
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


def load_artifact(
    path: str,
    cls,
    meta: ArtifactMeta,
    dtype: torch.dtype | None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Rebuild an artifact whose modules the config alone does not describe (of a
    model with its own code, where ``trust_remote_code`` lets that code run)."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = cls.from_config(config, trust_remote_code=trust_remote_code)
    for name, entry in meta.rebuild.items():
        try:
            replace_module(model, name, rebuild(entry))
        except (AttributeError, ValueError, KeyError) as e:
            raise UserError("--model", f"{path}/{META_FILE}: {name}: {e}") from None
    state = load_file(str(Path(path) / "model.safetensors"))
    for key, shape in meta.sparse.items():
        state[key] = from_bitmask(state, key, shape)
    for alias, kept in meta.aliases.items():
        state[alias] = state[kept]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            "--model",
            f"{path} does not match its lmbatch.json: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}",
        )
    if dtype is not None:
        model = model.to(dtype)
    return model


def from_bitmask(state: dict, key: str, shape: list[int]) -> torch.Tensor:
    values = state.pop(f"{key}.__values")
    bits = state.pop(f"{key}.__mask").numpy()
    n = int(np.prod(shape))
    mask = torch.from_numpy(np.unpackbits(bits)[:n].astype(bool))
    dense = torch.zeros(n, dtype=values.dtype)
    dense[mask] = values
    return dense.reshape(shape)
