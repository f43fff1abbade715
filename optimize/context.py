"""What every step of a recipe may use besides the model it changes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from lmbatch.actors.model_info import ModelSpec, inspect_model
from lmbatch.actors.tasks import Embed
from lmbatch.optimize.calibrate import Batch, Row


@dataclass
class Context:
    teacher: PreTrainedModel  # the original model, frozen: every step's reference
    tokenizer: object
    embed: Embed | None  # the infer job's embedding head (embed): pooling, Dense, ...
    calibration: list[Row]  # text (or text pairs) for statistics and training
    batches: list[Batch]  # the calibration text, tokenized once
    eval_batches: list[Batch]  # held-out text for fidelity
    # The original's spec: its path, and whether its pickles (a student's too) and
    # its own code may load (--allow-pickle, --trust-remote-code).
    base: ModelSpec
    # Unstructured pruning's masks, re-applied after every training step so that
    # fine-tuning cannot regrow what was pruned.
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    storage: dict[str, str] = field(default_factory=dict)  # weight name -> bitmask
    quantization: dict | None = None  # bitsandbytes settings the artifact stores by
    dtype: str = "fp32"  # the whole model's dtype after a fp16/bf16 quantize
    device: str = "cpu"  # where the model, the teacher and the batches live
    notes: list[str] = field(default_factory=list)  # said in the step's report line
    search: dict | None = None  # what a search step chose, for lmbatch.json
    # classify: how logits become scores (softmax, sigmoid, none; optimize/labels.py)
    scores: str = "softmax"

    @property
    def task(self) -> str:
        """embed, score or classify: decides losses and metrics."""
        return self.base.task

    def apply_masks(self, model: PreTrainedModel) -> None:
        with torch.no_grad():
            for name, mask in self.masks.items():
                model.get_parameter(name).mul_(mask)


def embed_head(spec: ModelSpec, teacher: PreTrainedModel) -> Embed | None:
    """The infer job's embedding head for the model at ``path`` (None for other
    tasks): fidelity and distillation compare the vectors a user gets, after every
    sentence-transformers module, not the pooled token states."""
    if spec.task != "embed":
        return None
    info = inspect_model(
        spec.path, spec.task, spec.trust_remote_code, spec.allow_pickle
    )
    return Embed(info.sentence, teacher.config.hidden_size, spec.path, teacher.device)
