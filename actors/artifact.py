"""The artifact format as the actors read it: ``lmbatch.json`` beside the weights.

An optimize job writes it (``optimize/artifact.py``); ``load_model`` reads it to know
the artifact's precision, the modules it must rebuild and the bitsandbytes settings
(which an artifact written before it stored quantised weights is quantised by at
load). Reading needs nothing but JSON, so the driver can check an artifact before
any actor starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lmbatch.errors import UserError

META_FILE = "lmbatch.json"


@dataclass
class ArtifactMeta:
    """What ``lmbatch.json`` holds: provenance, metrics, and what to rebuild."""

    base_model: str
    base_fingerprint: str
    task: str
    recipe: list[dict]
    precision: str = "fp32"  # fp32 | fp16 | bf16 | int8 | nf4 | mixed
    rebuild: dict[str, dict] = field(default_factory=dict)  # module -> kind, shapes
    sparse: dict[str, list[int]] = field(default_factory=dict)  # bitmask tensors
    aliases: dict[str, str] = field(default_factory=dict)  # tied tensor -> kept name
    quantization: dict | None = None  # bitsandbytes settings (method, skip, threshold)
    steps: list[dict] = field(default_factory=list)  # per-step metrics
    format: int = 1

    @property
    def cpu_only(self) -> bool:
        """Whether it holds layers on torch's int8 CPU kernels (cpu-int8)."""
        return any(entry["kind"] == "int8" for entry in self.rebuild.values())

    def check_precision(self, path: str, asked: str) -> None:
        """Refuse a ``--precision`` this artifact cannot run in, from lmbatch.json
        alone: the driver says so before any actor starts, and deletes nothing.

        Raises:
            UserError: naming ``--precision``.
        """
        check_own_precision(path, self.precision, asked, "an artifact")
        runs = asked if self.precision == "fp32" else self.precision
        if runs in ("int8", "nf4") and (self.rebuild or self.sparse):
            raise UserError(
                "--precision",
                f"{runs} cannot be applied to {path}: its lmbatch modules are not "
                "bitsandbytes layers; use fp32, fp16, bf16 or cpu-int8",
            )

    @classmethod
    def read(cls, path: str | Path) -> ArtifactMeta | None:
        file = Path(path) / META_FILE
        if not file.is_file():
            return None
        return cls(**json.loads(file.read_text()))


def check_own_precision(path: str, own: str, asked: str, what: str) -> None:
    """A model that holds its weights in a precision of its own runs in it: asking
    for another is refused (auto, and fp32, "as saved", take it).

    Raises:
        UserError: naming ``--precision``.
    """
    if own != "fp32" and asked not in ("auto", "fp32", own):
        raise UserError(
            "--precision", f"{path} is {what} already in {own}; leave --precision out"
        )


def stored_precision(path: str, asked: str) -> str | None:
    """int8 or nf4 where config.json says bitsandbytes stored the weights quantised
    (an lmbatch int8/nf4 artifact, or a hub's ``*-bnb-4bit`` checkpoint): they load
    as stored, as an artifact's do. None where ``--precision`` chooses.

    Raises:
        UserError: naming ``--model``, for weights stored by another method, or
            ``--precision``, ``asked`` being another.
    """
    file = Path(path) / "config.json"
    config = json.loads(file.read_text()) if file.is_file() else {}
    stored = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(stored, dict):
        return None
    method = stored.get("quant_method", "an unnamed method")
    if method == "bitsandbytes":
        kind = stored.get("bnb_4bit_quant_type", "fp4")
        own = "int8" if stored.get("load_in_8bit") else kind
        if own in ("int8", "nf4"):
            check_own_precision(path, own, asked, "quantised by bitsandbytes")
            return own
        method = f"bitsandbytes in 4-bit {kind}"
    raise UserError(
        "--model",
        f"{path} holds weights quantised by {method}; lmbatch runs checkpoints "
        "stored in full precision or by bitsandbytes in int8 or nf4",
    )
