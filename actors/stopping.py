"""Where each generated row ends, and why.

A row ends at one of the model's end-of-text tokens or where its new tokens spell a
``--stop`` string; else it runs out of ``--max-new-tokens``. The step at which each
row ended is recorded on the device while ``model.generate`` runs, so the output can
say how many tokens a row generated and whether it stopped or was cut short
(``finish_reason``, as vLLM names it), without decoding any text to find out.
"""

from __future__ import annotations

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StopStringCriteria,
)


def end_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple:
    """The tokens that end a text: the generation config's where it names them (a
    chat model's end of turn as well as of text), else the tokenizer's eos."""
    ids = model.generation_config.eos_token_id
    if ids is None:
        ids = tokenizer.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or ())
    return tuple(int(i) for i in ids)


def stop_strings(
    tokenizer: PreTrainedTokenizerBase, stops: tuple[str, ...]
) -> StopStringCriteria | None:
    """transformers' matcher of stop strings over token ends, built once per actor:
    it preprocesses the whole vocabulary."""
    return StopStringCriteria(tokenizer, list(stops)) if stops else None


class RowEnds(StoppingCriteria):
    """Rows that end at this step, each row's first such step kept in ``ended_at``
    (-1: not ended). Stop strings are matched in the new tokens only, never across
    the prompt's end, as vLLM matches them in the generated text."""

    def __init__(
        self,
        ends: torch.Tensor,
        stops: StopStringCriteria | None,
        prompt_length: int,
        rows: int,
    ) -> None:
        self.ends, self.stops, self.prompt_length = ends, stops, prompt_length
        self.ended_at = torch.full((rows,), -1, dtype=torch.long, device=ends.device)

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs
    ) -> torch.Tensor:
        done = torch.isin(input_ids[:, -1], self.ends)
        if self.stops is not None:
            done |= self.stops(input_ids[:, self.prompt_length :], scores)
        step = input_ids.shape[1] - self.prompt_length  # tokens generated so far
        self.ended_at = torch.where(done & (self.ended_at < 0), step, self.ended_at)
        return done

    def lengths(self, generated: int) -> torch.Tensor:
        """Tokens each row generated, the one that ended it counted."""
        return torch.where(self.ended_at < 0, generated, self.ended_at)
