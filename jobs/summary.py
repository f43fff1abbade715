"""The job summary: rows, tokens, speed, errors by kind and what each actor did.

Actors report cumulative stats to one ``StatsSink`` actor after every batch (a
fire-and-forget call); the driver reads it once at the end. The sink is a named actor
(``lmbatch-stats-<random>``), so a job in progress can be watched from outside. Row and
error counts come from the written Parquet itself, so the summary cannot disagree with
the output.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Collection
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import ray

from lmbatch.actors.model_info import computes_in_fp16
from lmbatch.jobs.output import SUMMARY_FILE
from lmbatch.jobs.session import this_node
from lmbatch.jobs.stages import Stage


@ray.remote(num_cpus=0)
class StatsSink:
    """Latest stats of every actor process: a restarted actor keeps its id and gets a
    new process, and each of its lives is reported."""

    def __init__(self) -> None:
        # Each with ``ready_at``, time.time() on this node when the process first
        # reported (its model loaded and its budget probed).
        self.actors: dict[str, dict] = {}
        self.first_batch_at: float | None = None  # when a batch first reached one

    def report(self, stats: dict) -> None:
        key = f"{stats['actor']}/{stats['pid']}"
        ready = self.actors[key]["ready_at"] if key in self.actors else time.time()
        if self.first_batch_at is None and stats.get("rows_started"):
            self.first_batch_at = time.time()
        self.actors[key] = {**stats, "ready_at": ready}

    def snapshot(self) -> list[dict]:
        """Each actor process's latest stats, with ``ready_at``."""
        return list(self.actors.values())

    def first_batch(self) -> float | None:
        """When a batch first reached an actor: the job waits for the pool till then."""
        return self.first_batch_at


SINK_PREFIX = "lmbatch-stats-"
# The output columns that say how each row came out (finish_reason: generate's;
# truncated: where the job truncates; windows: under --on-long chunk).
OUTCOME_COLUMNS = ("error", "finish_reason", "truncated", "windows")


def start_sink():
    """This run's StatsSink, under a name of its own (one driver may run many jobs),
    on the driver's node: a worker node lost mid-job must not take the stats with it."""
    return StatsSink.options(
        name=SINK_PREFIX + uuid.uuid4().hex[:12], scheduling_strategy=this_node()
    ).remote()


@dataclass
class Summary:
    rows: int
    tokens: int
    seconds: float
    rows_per_second: float
    tokens_per_second: float
    errors: dict[str, int]
    actors: list[dict] = field(default_factory=list)
    # generate: rows by finish_reason (stop, length), so that a job whose texts were
    # cut short by --max-new-tokens says so.
    finished: dict[str, int] = field(default_factory=dict)
    output: str = ""
    restored: int = 0  # rows an earlier run wrote (--resume)
    computed: int = 0  # rows this run computed
    ran: list[str] = field(default_factory=list)  # "DEVICE in PRECISION", each kind
    pool: str = ""  # how the pool was sized
    stages: list[Stage] = field(default_factory=list)  # where the time went
    startup_seconds: float = 0.0  # before the job: Ray up, the pool planned
    ray_seconds: float = 0.0  # of which: Ray up or attached
    first_batch_seconds: float | None = None  # into the job: first batch at an actor
    # Rows the inputs hold, where their metadata says (Parquet footers): the check
    # that rows out = rows in. None where it is not known.
    input_rows: int | None = None
    limit: int | None = None  # --limit: rows this run was to compute at most
    # Rows of the output computed on their first --max-length tokens only (its
    # ``truncated`` column; rows an earlier run of a resumed job wrote included).
    truncated: int = 0
    max_length: int | None = None  # tokens a row is cut to (--on-long truncate)
    can_chunk: bool = False  # the task reads long texts whole with --on-long chunk
    # --on-long chunk: rows longer than one window of --max-length, and their windows
    # (the output's ``windows`` column: a retried batch counts once).
    chunked: int = 0
    windows: int = 0

    @property
    def ready_seconds(self) -> list[float]:
        """When each actor process was ready, seconds into the job, sorted."""
        return sorted(a["ready_seconds"] for a in self.actors)

    def lines(self) -> list[str]:
        out = [
            f"ran on {'; '.join(self.ran) or 'no actor'}",
            f"pool {self.pool}",
            f"rows {self.rows}{self._of_input()}  tokens {self.tokens}  "
            f"seconds {self.seconds:.1f}",
            *self.missing(),
            self._startup_line(),
            f"restored {self.restored}  computed {self.computed}",
            f"rows/s {self.rows_per_second:.1f}  tokens/s {self.tokens_per_second:.0f}",
            "errors "
            + (", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "none"),
            *self._finished(),
            *self._overflowed(),
            *self._truncated(),
            *self._chunked(),
        ]
        if self.stages:
            stages = (s.describe(self.seconds) for s in self.stages)
            out.append("stages " + "; ".join(stages))
        for a in self.actors:
            mean = a["batched"] / max(1, a["micro_batches"])
            out.append(
                f"actor {a['actor'][:12]} node {a['node'][:8]} {a['device']} "
                f"{a['precision']} "
                f"rows {a['rows']} micro-batches "
                f"{a['micro_batches']} rows/batch {a['min_rows']}-{a['max_rows']} "
                f"(mean {mean:.1f}) "
                f"budget {list(a['budget_history'])} ooms {a['ooms']} "
                f"peak {a['peak_memory_bytes'] / 2**20:.0f} MiB "
                f"({a['memory_probe']}) "
                f"model {a['device_seconds']:.1f}s of {a['busy_seconds']:.1f}s busy"
            )
        out.append(f"output {self.output}")
        return out

    def _finished(self) -> list[str]:
        if not self.finished:
            return []
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.finished.items()))
        cut = self.finished.get("length", 0)
        hint = f" ({_rows(cut)} ran out of --max-new-tokens)" if cut else ""
        return [f"finished {counts}{hint}"]

    def _overflowed(self) -> list[str]:
        """The hint each ``not_finite`` row holds, said once where the user reads."""
        n = self.errors.get("not_finite", 0)
        if not n:
            return []
        line = (
            f"not_finite: {_rows(n)} came out NaN or inf, written as errors without "
            "values"
        )
        if any(computes_in_fp16(a["precision"], a["device"]) for a in self.actors):
            line += (
                "; some models overflow fp16 (in which int8 and nf4 compute on a GPU): "
                "--precision bf16 or fp32 keeps the range"
            )
        return [line]

    def _truncated(self) -> list[str]:
        if not self.truncated:
            return []
        share = self.truncated / max(1, self.rows)
        whole = "--on-long chunk reads each whole, " if self.can_chunk else ""
        return [
            f"truncated {_rows(self.truncated)} ({share:.1%} of {self.rows:,}) to "
            f"--max-length {self.max_length} tokens; {whole}--on-long error makes "
            "each an error instead"
        ]

    def _chunked(self) -> list[str]:
        if not self.chunked:
            return []
        return [
            f"chunked {_rows(self.chunked)} into {self.windows:,} windows of "
            f"--max-length {self.max_length} tokens, each row read whole"
        ]

    def _of_input(self) -> str:
        limited = "" if self.limit is None else f" (--limit {self.limit})"
        if self.input_rows is None:
            return limited
        return f" of {self.input_rows} input rows{limited}"

    def missing(self) -> list[str]:
        """A warning where the output's rows are not the inputs' rows, one for one
        (as many as ``--limit`` let this run compute)."""
        expected = expected_rows(self.input_rows, self.restored, self.limit)
        if expected is None or self.rows == expected:
            return []
        if self.rows > expected:
            return [
                f"warning: the output holds {_rows(self.rows - expected)} more "
                "than its inputs; please report this with its _summary.json"
            ]
        lost = f"warning: {_rows(expected - self.rows, 'input ')} no output row"
        if self.errors.get("bad_file"):  # its footer counted rows it could not read
            return [f"{lost}: a file that could not be read whole is one bad_file row"]
        if not self.restored:
            return [f"{lost}; please report this with its _summary.json"]
        return [
            f"{lost}: --resume skips every row whose --id-column value a finished "
            "file holds, so ids that repeat skip rows; run again with --overwrite "
            "and ids that do not repeat (or no --id-column)"
        ]

    def _startup_line(self) -> str:
        first = self.first_batch_seconds
        when = "no batch" if first is None else f"first batch {first:.1f}s into the job"
        if self.ready_seconds:
            when = f"{self._pool_startup()}, {when}"
        return (
            f"start-up {self.startup_seconds:.1f}s before the job (Ray "
            f"{self.ray_seconds:.1f}s); {when}"
        )

    def _pool_startup(self) -> str:
        """When the first and last actor were ready, and where the last one's time
        went once Ray had placed it and started its process: imports, model, probe."""
        ready = self.ready_seconds
        span = (
            f"{ready[0]:.1f}-{ready[-1]:.1f}s" if len(ready) > 1 else f"{ready[0]:.1f}s"
        )
        last = max(self.actors, key=lambda a: a["ready_seconds"])
        parts = {
            "imports": last["import_seconds"],
            "model": last["load_seconds"],
            "probe": last["probe_seconds"],
        }
        began = last["ready_seconds"] - sum(parts.values())
        spent = ", ".join(f"{name} {s:.1f}s" for name, s in parts.items())
        return (
            f"{len(ready)} actor(s) ready {span} (the last began at {began:.1f}s: "
            f"{spent})"
        )


def expected_rows(
    input_rows: int | None, restored: int, limit: int | None
) -> int | None:
    """Rows the output should hold when this run ends: every input row, or as many
    as ``--limit`` lets it add to those restored. None where the inputs' count is
    not known."""
    if input_rows is None or limit is None:
        return input_rows
    return min(input_rows, restored + limit)


def _rows(n: int, kind: str = "") -> str:
    """``2 input rows have`` or ``1 input row has``; ``3 rows``."""
    if kind:
        return f"{n:,} {kind}row has" if n == 1 else f"{n:,} {kind}rows have"
    return f"{n:,} row" if n == 1 else f"{n:,} rows"


def build_summary(
    fs: pafs.FileSystem,
    path: str,
    seconds: float,
    actors: list[dict],
    restored: int = 0,
    pool: str = "",
    own: Collection[str] = OUTCOME_COLUMNS,
) -> Summary:
    """Count rows and errors in the written output and merge the actors' stats.

    ``restored``: rows an earlier run of a resumed job had written; speeds count only
    the rows this run computed. ``own``: the job's own columns, not an input's kept
    under the same name (``count_outcomes``)."""
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    found = count_outcomes(dataset, own)
    rows = found.rows
    tokens = sum(a["tokens"] for a in actors)
    computed = rows - restored
    return Summary(
        rows=rows,
        tokens=tokens,
        seconds=round(seconds, 3),
        rows_per_second=round(computed / seconds, 2) if seconds else 0.0,
        tokens_per_second=round(tokens / seconds, 1) if seconds else 0.0,
        errors=dict(found.errors),
        actors=actors,
        finished=dict(found.finished),
        truncated=found.truncated,
        chunked=found.chunked,
        windows=found.windows,
        output=path,
        restored=restored,
        computed=computed,
        ran=sorted({f"{a['device']} in {a['precision']}" for a in actors}),
        pool=pool,
    )


@dataclass
class Outcomes:
    """What an output's rows came to, counted from the output itself: a batch
    retried after its actor died is written once, so counted once."""

    rows: int = 0
    errors: Counter = field(default_factory=Counter)  # by kind
    finished: Counter = field(default_factory=Counter)  # generate's, by finish_reason
    truncated: int = 0  # rows that lost tokens to --max-length
    chunked: int = 0  # rows read in more than one window (--on-long chunk)
    windows: int = 0  # the windows of those rows


def count_outcomes(
    dataset: pads.Dataset, own: Collection[str] = OUTCOME_COLUMNS
) -> Outcomes:
    """Rows, errors by kind, rows by ``finish_reason`` (generate's) and rows
    truncated or chunked, in one pass over those columns, counted by Arrow compute
    batch by batch: a kind is the ``error`` value up to its first colon. No loop
    over rows, so a hundred million rows count in the time it takes to read the
    columns. Only the job's ``own`` columns count: an embed job's kept input column
    ``truncated`` is data, not an outcome."""
    found = Outcomes()
    if "error" not in dataset.schema.names:  # no data file: the inputs held no row
        return found
    columns = [c for c in OUTCOME_COLUMNS if c in own and c in dataset.schema.names]
    for batch in dataset.to_batches(columns=columns):
        found.rows += batch.num_rows
        errors = batch.column("error").drop_null()
        if len(errors):
            kind = pc.list_element(pc.split_pattern(errors, ":", max_splits=1), 0)
            _tally(found.errors, kind)
        if "finish_reason" in columns:
            _tally(found.finished, batch.column("finish_reason").drop_null())
        if "truncated" in columns:
            found.truncated += pc.sum(batch.column("truncated")).as_py() or 0
        if "windows" in columns:
            windows = batch.column("windows")
            many = pc.filter(windows, pc.greater(windows, 1))
            found.chunked += len(many)
            found.windows += pc.sum(many).as_py() or 0
    return found


def _tally(counts: Counter, values: pa.Array) -> None:
    for found in pc.value_counts(values).to_pylist():
        counts[found["values"]] += found["counts"]


def write_summary(fs: pafs.FileSystem, path: str, summary: Summary) -> None:
    with fs.open_output_stream(f"{path}/{SUMMARY_FILE}") as f:
        f.write(json.dumps(asdict(summary), indent=2).encode())
