"""Where a job's time went, stage by stage, from Ray Data's own execution stats.

A pipeline runs as fast as its slowest stage. Each stage's task-seconds over the job's
seconds is how many of its tasks ran at once on average: tokenize near its share of
the CPUs means the actors wait on tokenizing; predict near the pool's size means the
model is the limit. A stage's CPU seconds well under its task-seconds mean its tasks
waited (for cores, for a GPU); when it began and ended in the job says whether a low
"at once" is a slow stage or one that finished early and waited for the next. The
summary prints it and ``_summary.json`` keeps it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray.data

log = logging.getLogger("lmbatch")
# Ray Data's operator names (fused ones joined by "->") to this job's stage names.
STAGE_NAMES = {
    "Read": "read",
    "tokenize_batch": "tokenize",
    "PredictActor": "predict",
    "Write": "write",
    "limit=": "limit",  # --limit
}


@dataclass(frozen=True)
class Stage:
    name: str  # read, tokenize, predict, write; or Ray Data's own operator name
    tasks: int  # Ray Data tasks; for predict, the calls handed to the actors
    seconds: float  # the tasks' wall time, summed (Ray Data times each block)
    rows: int  # rows the stage put out (a write task puts out one row)
    cpu_seconds: float = 0.0  # the tasks' processes' CPU time, summed
    began: float | None = None  # its first task's start, seconds into the job
    ended: float | None = None  # its last task's end; both None across nodes

    def describe(self, job_seconds: float) -> str:
        at_once = self.seconds / job_seconds if job_seconds else 0.0
        tasks = f"{self.tasks} task{'s' if self.tasks != 1 else ''}"
        span = "" if self.began is None else f" {self.began:.1f}-{self.ended:.1f}s"
        return (
            f"{self.name} {tasks} {self.seconds:.1f}s, CPU {self.cpu_seconds:.1f}s "
            f"({at_once:.1f} at once){span}"
        )


def stage_times(ds: ray.data.Dataset, started: float, one_node: bool) -> list[Stage]:
    """Each stage of an executed (written) dataset; [] where Ray Data has no stats.

    ``started``: the job's start, wall clock. Ray Data stamps tasks with the monotonic
    clock of the node they ran on, which this node's can be compared with only when
    every task ran here (``one_node``): across nodes the spans are left out.
    """
    try:
        summary = ds.get_stats_summary()
    except Exception as e:  # noqa: BLE001 - a report must never fail a finished job
        log.debug("no stage stats from Ray Data: %s", e)
        return []
    # A monotonic stamp plus this offset is wall clock, on this node.
    offset = time.time() - time.perf_counter() - started if one_node else None
    return [
        _stage(op, offset)
        for op in _operators(summary)
        if not op.is_sub_operator and op.wall_time is not None
    ]


def _stage(op, offset: float | None) -> Stage:
    """One operator's stats as a Stage; its span only where ``offset`` is known."""
    began = ended = None
    if offset is not None and op.earliest_start_time is not None:
        began = round(op.earliest_start_time + offset, 3)
        ended = round(op.latest_end_time + offset, 3)
    return Stage(
        name=stage_name(op.operator_name),
        tasks=int(op.task_rows.count) if op.task_rows else 0,
        seconds=round(float(op.wall_time.sum), 3),
        rows=int(op.output_num_rows.sum) if op.output_num_rows else 0,
        cpu_seconds=round(float(op.cpu_time.sum), 3) if op.cpu_time else 0.0,
        began=began,
        ended=ended,
    )


def _operators(summary) -> list:
    """Every operator in order: a written dataset's stats hold the write, and the
    stages before it as its parents."""
    before = [op for parent in summary.parents for op in _operators(parent)]
    return before + list(summary.operators_stats)


def stage_name(operator: str) -> str:
    """``ReadParquetRows->SplitBlocks(32)`` -> read; an unknown operator keeps its
    own name."""
    for key, name in STAGE_NAMES.items():
        if key in operator:
            return name
    return operator
