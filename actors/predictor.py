"""The model side of the predict stage: one model, many batches. An infer job's
actors build it inside ``PredictActor`` (``predict.py``); Serve replicas and the
optimize job's speed test build it directly.

``__init__`` loads the model once (``load_model``); ``__call__`` takes a batch of
tokenized rows (an Arrow table), lets the adaptive batcher cut it into micro-batches
by token budget, runs the task head on each and returns an Arrow table with the task's
columns, ``id`` and ``error``: one output row for every input row, in input order.

On a GPU the host work overlaps the device's: a micro-batch's results are waited for
only once the next micro-batch is queued, so the GPU computes while the host pads
the next rows (vectorised, ``padding.py``) and copies the last results out
(``transfer.py``).
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from lmbatch.actors.batching import TokenBudget, probe_budget, run_batched
from lmbatch.actors.loading import load_model, ran_precision
from lmbatch.actors.memory import (
    CpuMemory,
    CudaMemory,
    DeviceMemory,
    activation_floor,
    default_cpu_limit,
)
from lmbatch.actors.model_files import fetch_model
from lmbatch.actors.model_info import computes_in_fp16
from lmbatch.actors.outputs import Outputs, Windows
from lmbatch.actors.padding import TokenRows
from lmbatch.actors.predict import PredictorConfig
from lmbatch.actors.sampling import row_keys
from lmbatch.actors.stopping import end_ids
from lmbatch.actors.tasks import FINITE, Classify, Embed, Generate, Score, TaskHead
from lmbatch.actors.tokenize import (
    PAIR_TOKENS,
    PIPELINE_COLUMNS,
    TRUNCATED,
    WINDOW_SCORED,
    WINDOWS,
    load_tokenizer,
)
from lmbatch.actors.transfer import HostCopy, start_clock, to_device
from lmbatch.errors import UserError

log = logging.getLogger(__name__)
NO_CUDA = "cpu (a GPU was assigned but CUDA is not available)"
TOO_BIG = "out_of_memory: row does not fit even alone"


def not_finite_error(precision: str, device: str) -> str:
    """The error of a row whose values came out NaN or inf; where fp16's range is the
    likely cause, what keeps the range."""
    hint = "; fp16 overflows in some models: --precision bf16 or fp32 keeps the range"
    return f"not_finite: the model computed NaN or inf in {precision}" + (
        hint if computes_in_fp16(precision, device) else ""
    )


def make_head(
    config: PredictorConfig, model_dir: str, model, tokenizer, device
) -> TaskHead:
    task = config.model.task
    if task == "embed":
        sentence = config.info.sentence
        skip = 0 if sentence.include_prompt else prompt_tokens(tokenizer, config.prompt)
        return Embed(
            sentence, model.config.hidden_size, model_dir, device, skip,
            config.encoding, windows=config.chunk,
        )  # fmt: skip
    if task == "score":
        return Score()
    if task == "classify":
        info = config.info
        return Classify(info.id2label, model.config.num_labels, info.classify_function)
    return Generate(
        config.max_new_tokens, tokenizer, end_ids(model, tokenizer),
        config.sampling, config.stop,
    )  # fmt: skip


def prompt_tokens(tokenizer, prompt: str) -> int:
    """The tokens a prompt puts before a text, as sentence-transformers counts them:
    the prompt tokenized alone, less a special token it ends with."""
    if not prompt:
        return 0
    ids = tokenizer(prompt)["input_ids"]
    return len(ids) - (1 if ids and ids[-1] in tokenizer.all_special_ids else 0)


class Predictor:
    def __init__(self, config: PredictorConfig, import_seconds: float = 0.0) -> None:
        """``import_seconds``: how long this process took to import this module
        (``PredictActor``), for the summary's start-up line."""
        loading = time.perf_counter()
        torch.set_num_threads(max(1, config.threads))
        # bitsandbytes warns on every int8 matmul that fp32 inputs are cast to fp16.
        warnings.filterwarnings("ignore", message="MatMul8bitLt")
        self.config = config
        self.device, device_name = actor_device(config.device)
        # A URI's copy on this node, fetched once: weights, tokenizer, ST modules.
        spec = replace(config.model, path=fetch_model(config.model.path))
        self.model = load_model(spec, self.device.type)
        self.tokenizer = load_tokenizer(spec.path, spec.trust_remote_code)
        self.head = make_head(
            config, spec.path, self.model, self.tokenizer, self.device
        )
        # The probe measures the longest a batch can run: no row ends early.
        self.probe_head = (
            replace(self.head, stop=(), full_length=True)
            if isinstance(self.head, Generate)
            else self.head
        )
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        # A text pair's second text, marked token by token: a classifier's token
        # types where its tokenizer gives them (BERT's does; RoBERTa's does not, and
        # its one type would be out of range); score's tokens to score.
        self.marks_pairs = config.model.task == "score" or (
            "token_type_ids" in self.tokenizer.model_input_names
        )
        # A sampled row's draws come from its id's key (actors/sampling.py).
        self.keyed = config.model.task == "generate" and config.sampling is not None
        # Generation's padded size grows by the tokens it appends.
        self.extra_tokens = (
            config.max_new_tokens if config.model.task == "generate" else 0
        )
        loaded = time.perf_counter()
        self.memory = device_memory(self.device, config)
        self.budget = self._first_budget()
        self.stats = ActorStats(
            actor=_actor_name(),
            node=_node_id(),
            pid=os.getpid(),
            device=device_name,
            precision=ran_precision(spec, self.device.type),
            threads=config.threads,
            memory_limit_bytes=self.memory.capacity(),
            memory_probe=self.memory.method,
            peak_memory_bytes=self.memory.high_water(),  # the model and the probe
            import_seconds=round(import_seconds, 3),
            load_seconds=round(loaded - loading, 3),
            probe_seconds=round(time.perf_counter() - loaded, 3),
        )
        self.not_finite = not_finite_error(self.stats.precision, self.device.type)
        self._report()  # an actor that never gets a batch is in the summary too

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        self.stats.rows_started += batch.num_rows
        self._report()  # were this process to die now, these rows were lost work
        given = np.flatnonzero(batch["_error"].is_null().to_numpy())  # rows to run
        tokens, todo, out = self._inputs(batch, given)
        keys = row_keys(batch["id"].to_pylist()) if self.keyed else None
        failed: dict[int, str] = {}  # row -> its error, where the model failed it
        pending = None
        with torch.inference_mode():
            for rows, copy in run_batched(
                tokens.lengths[todo] + self.extra_tokens,
                self.budget,
                lambda r: self._step(tokens, todo[r], keys),
                lambda r: failed.setdefault(out.fail(int(todo[r])), TOO_BIG),
                over_limit=self.memory.over_limit,
            ):
                self.stats.add_batch(len(rows), int(tokens.lengths[todo[rows]].sum()))
                if pending is not None:  # waited for only now: the GPU has work
                    self._collect(out, *pending, failed)
                pending = (todo[rows], copy)
            if pending is not None:
                self._collect(out, *pending, failed)
        self.stats.errors += batch.num_rows - len(given) + len(failed)
        self.stats.finish_call(
            batch.num_rows, time.perf_counter() - started, self.budget
        )
        self._report()
        return self._table(batch, out, failed)

    def _inputs(
        self, batch: pa.Table, given: np.ndarray
    ) -> tuple[TokenRows, np.ndarray, Outputs | Windows]:
        """What the model runs (each row's tokens, or each window's under --on-long
        chunk), which of them to run (``given``: the rows without an error, whose
        windows are all there are), and where their results go."""
        names = batch.column_names
        if WINDOWS.name in names:
            scored = batch[WINDOW_SCORED.name] if WINDOW_SCORED.name in names else None
            tokens, owner = TokenRows.windows(
                batch["_ids"], batch[WINDOWS.name], scored
            )
            out = Windows(self.head, owner, tokens.lengths, batch.num_rows)
            return tokens, np.arange(len(owner)), out
        pairs = PAIR_TOKENS.name in names and self.marks_pairs
        tokens = TokenRows.from_arrow(
            batch["_ids"], batch[PAIR_TOKENS.name] if pairs else None
        )
        return tokens, given, Outputs(self.head.schema, batch.num_rows)

    def _collect(
        self,
        out: Outputs | Windows,
        rows: np.ndarray,
        copy: HostCopy,
        failed: dict[int, str],
    ) -> None:
        host = copy.wait()
        finite = host.pop(FINITE)
        out.put(rows, self.head.columns(host))
        for row in rows[~finite]:  # its values are NaN: none are written
            failed.setdefault(out.fail(int(row)), self.not_finite)
        self.stats.device_seconds += copy.seconds

    def _report(self) -> None:
        if self.config.stats is not None:
            self.config.stats.report.remote(self.stats.snapshot())

    def _first_budget(self) -> TokenBudget:
        """The user's fixed --batch-tokens, or what a probe batch says fits."""
        if self.config.batch_tokens:
            tokens = self.config.batch_tokens
            return TokenBudget(tokens, tokens, fixed=True)
        if self.device.type == "cpu":
            self.memory.start()  # near its limit, freed pages go back first
            if self._holds_too_much():
                # No room at all. The first batch says so (_check_room): an error in
                # the actor's start, Ray would retry, and print with its traceback.
                return TokenBudget(1, 1)
        floor = activation_floor(
            self.model.config.hidden_size, _dtype_bytes(self.model)
        )
        longest = self.config.max_length + self.extra_tokens
        return probe_budget(self.memory, self._probe, self.device.type, floor, longest)

    def _probe(self, rows: int, length: int) -> None:
        """The task head on a synthetic batch of ``length`` tokens a row, for the
        memory probe; generate's prompt is shorter by the tokens it appends."""
        width = max(1, length - self.extra_tokens)
        ids = torch.full(
            (rows, width), self.pad_id, dtype=torch.long, device=self.device
        )
        keys = [torch.zeros_like(ids[:, 0])] if self.keyed else []
        with torch.inference_mode():
            started = start_clock(self.device)
            out = self.probe_head(self.model, ids, torch.ones_like(ids), *keys)
            HostCopy(out, started).wait()

    def _step(
        self, tokens: TokenRows, rows: np.ndarray, keys: np.ndarray | None = None
    ) -> HostCopy:
        """Queue one micro-batch on the device; its results follow asynchronously."""
        self.memory.start()
        self._check_room()
        try:
            padded = tokens.pad(rows, self.pad_id, self.head.padding_side)
            inputs = to_device(
                (*padded, *([] if keys is None else [keys[rows]])), self.device
            )
            started = start_clock(self.device)
            return HostCopy(self.head(self.model, *inputs), started)
        finally:
            self.stats.peak_memory_bytes = max(
                self.stats.peak_memory_bytes, self.memory.high_water()
            )

    def _holds_too_much(self) -> bool:
        """A CPU actor that holds more than its limit at ``start``, freed pages
        handed back, gets under it with no smaller batch. (On a GPU the allocator
        raises out-of-memory itself.)"""
        held = self.memory.held()
        return self.device.type == "cpu" and held > self.memory.capacity()

    def _check_room(self) -> None:
        """Say so, rather than halve the budget to a row a batch and crawl on, over
        the limit all the same."""
        if self._holds_too_much():
            raise no_room(self.memory.held(), self.memory.capacity(), self.config)

    def _table(
        self, batch: pa.Table, out: Outputs | Windows, failed: dict[int, str]
    ) -> pa.Table:
        errors = batch["_error"]
        if failed:
            values = errors.to_pylist()
            for row, error in failed.items():
                values[row] = error
            errors = pa.array(values, pa.string())
        kept = [f for f in batch.schema if f.name not in PIPELINE_COLUMNS]
        outcome = [("error", pa.string())]
        arrays = [batch["id"], *out.arrays(), errors]
        ok = pc.is_null(errors)
        if TRUNCATED.name in batch.column_names:  # the job truncates: which rows were
            outcome.append(("truncated", pa.bool_()))
            arrays.append(pc.if_else(ok, batch[TRUNCATED.name], None))
        if isinstance(out, Windows):  # --on-long chunk: how many windows each row took
            outcome.append(("windows", pa.int32()))
            per_row = np.bincount(out.owner, minlength=batch.num_rows).astype(np.int32)
            arrays.append(pc.if_else(ok, pa.array(per_row), None))
        schema = pa.schema([("id", pa.string()), *self.head.schema, *outcome, *kept])
        arrays += [batch[f.name] for f in kept]
        return pa.Table.from_arrays(arrays, schema=schema)


@dataclass
class ActorStats:
    """What one actor did, for the job summary."""

    actor: str
    node: str  # Ray node id: where the actor ran, in multi-node jobs
    pid: int
    device: str  # what the model ran on, said plainly when it is not what was planned
    precision: str  # what the weights ran in (auto made concrete)
    threads: int
    rows: int = 0
    rows_started: int = 0  # more than rows while a call runs, or if it never ended
    errors: int = 0  # rows given an error value
    tokens: int = 0
    micro_batches: int = 0
    batched: int = 0  # rows run in micro-batches (windows, under --on-long chunk)
    busy_seconds: float = 0.0  # in __call__, host work included
    device_seconds: float = 0.0  # the model's own time on its device
    min_rows: int = 0
    max_rows: int = 0
    budget_history: tuple[int, ...] = ()
    ooms: int = 0
    memory_limit_bytes: int = 0  # what this actor's batches were sized to fit
    memory_probe: str = ""  # how its peaks were measured
    peak_memory_bytes: int = 0
    # Its start-up once Ray had placed it and started its process: torch and
    # transformers imported; device, model, tokenizer and head loaded; the memory
    # probe that sized its first budget.
    import_seconds: float = 0.0
    load_seconds: float = 0.0
    probe_seconds: float = 0.0

    def add_batch(self, rows: int, tokens: int) -> None:
        self.tokens += tokens
        self.micro_batches += 1
        self.batched += rows
        self.min_rows = rows if self.micro_batches == 1 else min(self.min_rows, rows)
        self.max_rows = max(self.max_rows, rows)

    def finish_call(self, rows: int, seconds: float, budget: TokenBudget) -> None:
        self.rows += rows
        self.busy_seconds += seconds
        self.budget_history = tuple(budget.history)
        self.ooms = budget.ooms

    def snapshot(self) -> dict:
        return dict(vars(self))


def actor_device(planned: str) -> tuple[torch.device, str]:
    """The device to run on, and how the summary names it. An actor that Ray gave
    a GPU but that finds no CUDA (a broken driver, a fake GPU node) runs on CPU,
    loudly."""
    if planned != "cuda":
        return torch.device("cpu"), "cpu"
    if torch.cuda.is_available():
        return torch.device("cuda"), f"cuda ({torch.cuda.get_device_name()})"
    log.warning("lmbatch actor: running on CPU: %s", NO_CUDA)
    return torch.device("cpu"), NO_CUDA


def device_memory(device: torch.device, config: PredictorConfig) -> DeviceMemory:
    if device.type == "cuda":
        return CudaMemory(device, _gpu_share())
    return CpuMemory(config.memory_limit or default_cpu_limit(config.actors_per_node))


def no_room(held: int, limit: int, config: PredictorConfig) -> UserError:
    """The flag that set a CPU actor's limit below what it holds between batches,
    and a size that leaves room for batches: half as much again, in quarter GiB."""
    given, holds = f"{limit / 2**20:,.0f} MiB", f"{held / 2**20:,.0f} MiB"
    more = f"{math.ceil(held * 1.5 / 2**28) / 4:g}GiB"
    what = f"({holds}: the model, Python and torch)"
    if config.memory_limit:
        return UserError(
            "--actor-memory",
            f"{given} is less than a CPU actor holds between batches {what}, so no "
            f"batch fits under it; e.g. --actor-memory {more}",
        )
    if config.share_flag and config.actors_per_node > 1:
        fewer = "run fewer"
        if config.share_flag == "--actors":  # infer's actors can be given a size
            fewer += f", or give each --actor-memory {more} where nodes have it"
        return UserError(
            config.share_flag,
            f"{config.actors_per_node} {config.share_flag[2:]} a node leave each "
            f"{given} of its free memory, less than one holds between batches {what}; "
            f"{fewer}",
        )
    return UserError(
        "--model",
        f"the {given} this machine has free is less than its process holds between "
        f"batches {what}; free some memory here, or run a smaller model or precision",
    )


def _dtype_bytes(model) -> int:
    """Bytes of the compute dtype (fp32 for bitsandbytes on CPU, not int8)."""
    return torch.empty((), dtype=model.dtype).element_size()


def _gpu_share() -> float:
    """The fraction of its GPU Ray gave this actor (1.0 outside Ray, and in a driver,
    which Ray assigns nothing: an optimize recipe run in-process measures there)."""
    import ray

    if not ray.is_initialized():
        return 1.0
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        return 1.0
    share = context.get_assigned_resources().get("GPU")
    return float(share) if share else 1.0


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def _actor_name() -> str:
    import ray

    # get_runtime_context() would start a Ray of its own outside one (a plain object).
    actor = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
    return actor or f"pid-{os.getpid()}"
