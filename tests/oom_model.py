"""A BERT that runs out of memory above a token count: the fault to survive.

Saved into a model directory as remote code (``auto_map``), so that the very actors of a
real Ray job load it through ``load_model`` with ``--trust-remote-code``: no hook in
lmbatch's own code.
"""

from __future__ import annotations

import torch
from transformers import BertConfig, BertModel


class OomBertConfig(BertConfig):
    model_type = "oom-bert"

    def __init__(self, oom_above_tokens: int = 10**9, **kwargs) -> None:
        super().__init__(**kwargs)
        self.oom_above_tokens = oom_above_tokens


class OomBertModel(BertModel):
    config_class = OomBertConfig

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        if input_ids is not None and input_ids.numel() > self.config.oom_above_tokens:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate for {input_ids.numel()} tokens"
            )
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, **kwargs
        )
