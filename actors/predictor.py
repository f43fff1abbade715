"""The callable class that Ray Data's actor pool runs: one model, many batches.

``__init__`` loads the model once (``load_model``); ``__call__`` takes a batch of
tokenized rows, lets the adaptive batcher cut it into micro-batches by token budget,
runs the task head on each and returns an Arrow table with the task's columns, ``id``
and ``error``: one output row for every input row, in input order.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from actors.batching import TokenBudget, probe_budget, run_batched
from actors.loading import ModelInfo, ModelSpec, load_model, load_tokenizer
from actors.memory import (
    CpuMemory,
    CudaMemory,
    DeviceMemory,
    activation_floor,
    default_cpu_limit,
)
from actors.tasks import Classify, Embed, Generate, Score, TaskHead


@dataclass(frozen=True)
class PredictorConfig:
    """Everything an actor needs, picklable, built once on the driver."""

    model: ModelSpec
    info: ModelInfo
    threads: int = 1  # torch intra-op threads for this actor
    batch_tokens: int | None = None  # fixed budget (--batch-tokens); None adapts
    max_new_tokens: int = 32
    max_length: int = 512  # longest row in tokens, as the tokenize stage cut it
    memory_limit: int | None = None  # CPU bytes (--actor-memory); None: a node share
    actors_per_node: int = 1  # for that share
    stats: object | None = None  # a StatsSink actor handle, or None


def make_head(config: PredictorConfig, tokenizer) -> TaskHead:
    task = config.model.task
    if task == "embed":
        return Embed(config.info.pooling)
    if task == "score":
        return Score()
    if task == "classify":
        return Classify(config.info.id2label)
    return Generate(config.max_new_tokens, tokenizer)


class Predictor:
    def __init__(self, config: PredictorConfig) -> None:
        torch.set_num_threads(max(1, config.threads))
        # bitsandbytes warns on every int8 matmul that fp32 inputs are cast to fp16.
        warnings.filterwarnings("ignore", message="MatMul8bitLt")
        self.config = config
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(config.model, self.device.type)
        self.tokenizer = load_tokenizer(
            config.model.path, config.model.trust_remote_code
        )
        self.head = make_head(config, self.tokenizer)
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        # Generation's padded size grows by the tokens it appends.
        self.extra_tokens = (
            config.max_new_tokens if config.model.task == "generate" else 0
        )
        self.memory = device_memory(self.device, config)
        self.budget = self._first_budget()
        self.stats = ActorStats(
            actor=_actor_name(),
            node=_node_id(),
            pid=os.getpid(),
            device=str(self.device),
            threads=config.threads,
            memory_limit_bytes=self.memory.capacity(),
            peak_memory_bytes=self.memory.high_water(),  # the model and the probe
        )
        self._report()  # an actor that never gets a batch is in the summary too

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        started = time.perf_counter()
        self.stats.rows_started += len(batch["id"])
        self._report()  # were this process to die now, these rows were lost work
        errors: list[str | None] = list(batch["_error"])
        todo = np.array([i for i, e in enumerate(errors) if e is None], dtype=np.int64)
        ids = [batch["_ids"][i] for i in todo]
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        columns = {name: [None] * len(errors) for name in self.head.schema.names}

        def on_row_oom(row: int) -> None:
            errors[todo[row]] = "out_of_memory: row does not fit even alone"

        with torch.inference_mode():
            for rows, result in run_batched(
                lengths + self.extra_tokens,
                self.budget,
                lambda r: self._step(ids, r),
                on_row_oom,
                over_limit=self.memory.over_limit,
            ):
                self.stats.add_batch(len(rows), int(lengths[rows].sum()))
                for name, values in result.items():
                    for row, value in zip(rows, values, strict=True):
                        columns[name][todo[row]] = value
        self.stats.finish_call(len(errors), time.perf_counter() - started, self.budget)
        self._report()
        return self._table(batch["id"], columns, errors)

    def _report(self) -> None:
        if self.config.stats is not None:
            self.config.stats.report.remote(self.stats.snapshot())

    def _first_budget(self) -> TokenBudget:
        """The user's fixed --batch-tokens, or what a probe batch says fits."""
        if self.config.batch_tokens:
            tokens = self.config.batch_tokens
            return TokenBudget(tokens, tokens, fixed=True)
        floor = activation_floor(
            self.model.config.hidden_size, _dtype_bytes(self.model)
        )
        longest = self.config.max_length + self.extra_tokens
        return probe_budget(self.memory, self._probe, self.device.type, floor, longest)

    def _probe(self, rows: int, length: int) -> None:
        """The task head on a synthetic batch, for the memory probe."""
        ids = torch.full(
            (rows, length), self.pad_id, dtype=torch.long, device=self.device
        )
        with torch.inference_mode():
            self.head(self.model, ids, torch.ones_like(ids))

    def _step(self, ids: list[np.ndarray], rows: np.ndarray) -> dict[str, list]:
        self.memory.start()
        try:
            return self._run_head(ids, rows)
        finally:
            self.stats.peak_memory_bytes = max(
                self.stats.peak_memory_bytes, self.memory.high_water()
            )

    def _run_head(self, ids: list[np.ndarray], rows: np.ndarray) -> dict[str, list]:
        width = max(len(ids[r]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            n = len(ids[r])
            span = (
                slice(width - n, width)
                if self.head.padding_side == "left"
                else slice(0, n)
            )
            input_ids[j, span] = torch.from_numpy(ids[r].astype(np.int64))
            mask[j, span] = 1
        return self.head(self.model, input_ids.to(self.device), mask.to(self.device))

    def _table(
        self, row_ids: np.ndarray, columns: dict[str, list], errors: list
    ) -> pa.Table:
        arrays = [pa.array(list(row_ids), pa.string())]
        arrays += [pa.array(columns[f.name], f.type) for f in self.head.schema]
        arrays.append(pa.array(errors, pa.string()))
        schema = pa.schema(
            [("id", pa.string()), *self.head.schema, ("error", pa.string())]
        )
        return pa.Table.from_arrays(arrays, schema=schema)


@dataclass
class ActorStats:
    """What one actor did, for the job summary."""

    actor: str
    node: str  # Ray node id: where the actor ran, in multi-node jobs
    pid: int
    device: str
    threads: int
    rows: int = 0
    rows_started: int = 0  # more than rows while a call runs, or if it never ended
    tokens: int = 0
    micro_batches: int = 0
    busy_seconds: float = 0.0
    min_rows: int = 0
    max_rows: int = 0
    budget_history: tuple[int, ...] = ()
    ooms: int = 0
    memory_limit_bytes: int = 0  # what this actor's batches were sized to fit
    peak_memory_bytes: int = 0

    def add_batch(self, rows: int, tokens: int) -> None:
        self.tokens += tokens
        self.micro_batches += 1
        self.min_rows = rows if self.micro_batches == 1 else min(self.min_rows, rows)
        self.max_rows = max(self.max_rows, rows)

    def finish_call(self, rows: int, seconds: float, budget: TokenBudget) -> None:
        self.rows += rows
        self.busy_seconds += seconds
        self.budget_history = tuple(budget.history)
        self.ooms = budget.ooms

    def snapshot(self) -> dict:
        return dict(vars(self))


def device_memory(device: torch.device, config: PredictorConfig) -> DeviceMemory:
    if device.type == "cuda":
        return CudaMemory(device)
    return CpuMemory(config.memory_limit or default_cpu_limit(config.actors_per_node))


def _dtype_bytes(model) -> int:
    """Bytes of the compute dtype (fp32 for bitsandbytes on CPU, not int8)."""
    return torch.empty((), dtype=model.dtype).element_size()


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def _actor_name() -> str:
    import ray

    # get_runtime_context() would start a Ray of its own outside one (a plain object).
    actor = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
    return actor or f"pid-{os.getpid()}"
