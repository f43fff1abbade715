"""What the driver hands Ray Data's actor pool: the actor class and its config, both
importable without torch.

The driver never loads a model. Importing the ``Predictor`` there would import torch
and transformers (3.8 s on 2 cores) before the pool could start, and each actor
imports them again anyway: the two imports ran one after the other on the start-up's
critical path. Each actor's process now imports them once, in ``__init__``, and says
how long that took.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow as pa

from lmbatch.actors.model_info import ModelInfo, ModelSpec
from lmbatch.actors.sampling import Sampling
from lmbatch.actors.sentence import Encoding
from lmbatch.errors import UserError


@dataclass(frozen=True)
class PredictorConfig:
    """Everything an actor needs, picklable, built once on the driver."""

    model: ModelSpec
    info: ModelInfo
    device: str = "cpu"  # cuda where the pool gives each actor a share of a GPU
    threads: int = 1  # torch intra-op threads for this actor
    batch_tokens: int | None = None  # fixed budget (--batch-tokens); None adapts
    max_new_tokens: int = 32
    max_length: int = 512  # longest row in tokens, as the tokenize stage cut it
    prompt: str = ""  # put before every text by the tokenize stage (embed)
    encoding: Encoding = Encoding()  # embed: --truncate-dim, --normalize, its bytes
    chunk: bool = False  # embed: --on-long chunk, a long text's windows merged
    sampling: Sampling | None = None  # generate: --temperature's draws; None: greedy
    stop: tuple[str, ...] = ()  # generate: --stop strings
    memory_limit: int | None = None  # CPU bytes (--actor-memory); None: a node share
    actors_per_node: int = 1  # for that share
    # The flag that set actors_per_node, for an error that says how to give each more
    # room: --actors (infer), --replicas (serve); None where it is not the user's.
    share_flag: str | None = None
    stats: object | None = None  # a StatsSink actor handle, or None


class PredictActor:
    """Ray Data's callable class for the predict stage: a ``Predictor`` built in the
    actor's own process."""

    def __init__(self, config: PredictorConfig) -> None:
        importing = time.perf_counter()
        from lmbatch.actors.predictor import Predictor

        self.failed: UserError | None = None
        try:
            self.predictor = Predictor(config, time.perf_counter() - importing)
        except UserError as error:
            # Raised here, it would kill the actor: Ray reports the death without
            # this line, prints the traceback, and retries. Raised from the first
            # call, it fails the job as the one line the user acts on.
            self.failed = error

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.failed is not None:
            raise UserError(self.failed.where, self.failed.message)
        return self.predictor(batch)
