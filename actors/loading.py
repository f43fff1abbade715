"""``load_model``: the one place a model is loaded, for every task and precision.

It runs inside each actor (and the optimize task); the driver checks the model from
its files alone first (``model_info.inspect_model``). Weights are safetensors only
unless the user allows pickles, and ``trust_remote_code`` stays off unless asked.
An lmbatch artifact is rebuilt here too (``load_artifact``), from the format
``artifact.py`` reads.
"""

from __future__ import annotations

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
from transformers.utils import logging as hf_logging

from lmbatch.actors.artifact import META_FILE, ArtifactMeta
from lmbatch.actors.layers import rebuild, replace_module
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
    """An lmbatch artifact carries its precision: ``--precision`` may only repeat it,
    or pick one for an artifact saved in fp32; ``auto`` (and fp32, what ``ModelSpec``
    means by "as saved") take the artifact's own.
    Returns (spec with a concrete precision, bnb skips, meta)."""
    meta = ArtifactMeta.read(spec.path)
    if meta is not None:
        meta.check_precision(spec.path, spec.precision)
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
