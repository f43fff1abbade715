"""Run a job spec here, to the end; also the entrypoint a cluster submission runs.

    python -m jobs.run infer|optimize '<spec as JSON>'

On a cluster the Jobs API sets ``RAY_ADDRESS`` to the cluster, so the driver attaches
to it; a user's mistake found there prints one line and exits 2, as it would here.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from actors.errors import find_user_error


def run_job(kind: str, spec: Any, address: str | None) -> list[str]:
    """Validate ``spec``, run it on ``address`` (None: an embedded local Ray), and
    return the lines that tell the user what happened."""
    if kind == "infer":
        from jobs.infer import run_infer
        from jobs.spec import prepare_infer

        return run_infer(prepare_infer(spec), address).lines()
    from jobs.optimize import prepare_optimize, run_optimize

    plan = prepare_optimize(spec)
    return optimize_lines(plan, run_optimize(plan, address))


def optimize_lines(plan, results: list[dict]) -> list[str]:
    from optimize.report import FIDELITY

    metric = FIDELITY[plan.task]
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


def spec_class(kind: str) -> type:
    if kind == "infer":
        from jobs.spec import InferSpec

        return InferSpec
    if kind == "optimize":
        from jobs.optimize import OptimizeSpec

        return OptimizeSpec
    raise SystemExit(f"unknown job kind {kind!r}: infer or optimize")


def main(argv: list[str]) -> int:
    from jobs.submit import spec_from_json

    if len(argv) != 2:
        raise SystemExit("usage: python -m jobs.run infer|optimize '<spec JSON>'")
    spec = spec_from_json(spec_class(argv[0]), argv[1])
    try:
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
