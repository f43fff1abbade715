"""The artifact format as the actors read it: ``lmbatch.json`` beside the weights.

An optimize job writes it (``optimize/artifact.py``); ``load_model`` reads it to know
the artifact's precision, the modules it must rebuild and the bitsandbytes settings
to re-apply. Reading needs nothing but JSON, so the driver can check an artifact
before any actor starts.
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
    quantization: dict | None = None  # bitsandbytes settings for load_model
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
        if self.precision != "fp32" and asked not in ("auto", "fp32", self.precision):
            raise UserError(
                "--precision",
                f"{path} is an artifact already in {self.precision}; "
                "leave --precision out",
            )
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
