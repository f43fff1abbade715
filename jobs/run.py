"""Run a job spec here, to the end; also the entrypoint a cluster submission runs.

    python -m lmbatch.jobs.run infer|optimize '<spec as JSON>'

On a cluster the Jobs API sets ``RAY_ADDRESS`` to the cluster, so the driver attaches
to it; a user's mistake found there prints one line and exits 2, as it would here.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from lmbatch.errors import find_user_error
from lmbatch.jobs.spec import InferSpec, OptimizeSpec


def run_job(kind: str, spec: Any, address: str | None) -> list[str]:
    """Validate ``spec``, run it on ``address`` (None: an embedded local Ray), and
    return the lines that tell the user what happened."""
    if kind == "infer":
        from lmbatch.jobs.infer import dry_run, run_infer
        from lmbatch.jobs.spec import prepare_infer

        plan = prepare_infer(spec)
        return (
            dry_run(plan, address) if spec.dry_run else run_infer(plan, address).lines()
        )
    from lmbatch.jobs.optimize import prepare_optimize, run_optimize

    plan = prepare_optimize(spec)
    return optimize_lines(plan, run_optimize(plan, address))


def optimize_lines(plan, results: list[dict]) -> list[str]:
    from lmbatch.optimize.report import headline

    metric = headline(plan.task, results[0]["metrics"])
    base = results[0]["metrics"]["rows_per_s"]
    lines = []
    for r in results:
        m = r["metrics"]
        lines.append(
            f"{r['name']:<16} {metric} {m[metric]:.4f}  "
            f"{m['bytes'] / 1e6:8.1f} MB  {m['rows_per_s']:8.1f} rows/s "
            f"({m['rows_per_s'] / base:.2f}x)"
        )
    lines.append(f"artifact: {plan.spec.output} (report.md, tradeoff.png)")
    return lines


SPECS = {"infer": InferSpec, "optimize": OptimizeSpec}
USAGE = "usage: python -m lmbatch.jobs.run infer|optimize '<spec JSON>'"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in SPECS:
        raise SystemExit(USAGE)
    try:
        spec = SPECS[argv[0]].from_json(argv[1])
        lines = run_job(argv[0], spec, os.environ.get("RAY_ADDRESS") or "auto")
    except Exception as exc:  # noqa: BLE001 - only user errors are reworded
        found = find_user_error(exc)
        if found is None:
            raise
        print(f"Error: {found}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
