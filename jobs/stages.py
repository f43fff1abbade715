"""Where a job's time went, stage by stage, from Ray Data's own execution stats.

A pipeline runs as fast as its slowest stage. Each stage's task-seconds over the job's
seconds is how many of its tasks ran at once on average: tokenize near its share of
the CPUs means the actors wait on tokenizing; predict near the pool's size means the
model is the limit. The summary prints it and ``_summary.json`` keeps it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray.data

log = logging.getLogger("lmbatch")
# Ray Data's operator names (fused ones joined by "->") to this job's stage names.
STAGE_NAMES = {
    "Read": "read",
    "tokenize_batch": "tokenize",
    "Predictor": "predict",
    "Write": "write",
}


@dataclass(frozen=True)
class Stage:
    name: str  # read, tokenize, predict, write; or Ray Data's own operator name
    tasks: int  # Ray Data tasks; for predict, the calls handed to the actors
    seconds: float  # the tasks' wall time, summed (Ray Data times each block)
    rows: int  # rows the stage put out (a write task puts out one row)

    def describe(self, job_seconds: float) -> str:
        at_once = self.seconds / job_seconds if job_seconds else 0.0
        tasks = f"{self.tasks} task{'s' if self.tasks != 1 else ''}"
        return f"{self.name} {tasks} {self.seconds:.1f}s ({at_once:.1f} at once)"


def stage_times(ds: ray.data.Dataset) -> list[Stage]:
    """Each stage of an executed (written) dataset; [] where Ray Data has no stats."""
    try:
        summary = ds.get_stats_summary()
    except Exception as e:  # noqa: BLE001 - a report must never fail a finished job
        log.debug("no stage stats from Ray Data: %s", e)
        return []
    stages = []
    for op in _operators(summary):
        if op.is_sub_operator or op.wall_time is None:
            continue
        stages.append(
            Stage(
                name=stage_name(op.operator_name),
                tasks=int(op.task_rows.count) if op.task_rows else 0,
                seconds=round(float(op.wall_time.sum), 3),
                rows=int(op.output_num_rows.sum) if op.output_num_rows else 0,
            )
        )
    return stages


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
