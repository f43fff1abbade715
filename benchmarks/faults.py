"""The fault table: every fault a job must survive, with what it cost.

Each fault is proven by a test on a real local Ray (pytest marker ``fault``); this
script runs exactly those tests, each of which records rows in, rows out, lost,
duplicated and recomputed into the file ``LMBATCH_FAULT_REPORT`` names, and prints
and appends the table. Recomputed: rows the model was handed again beyond the rows
that needed computing (a batch in flight when its actor died, say).

Target: 0 lost and 0 duplicated in every row.

Usage: python benchmarks/faults.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, append_results  # isort: skip


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "faults.jsonl"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-m",
                "fault",
                "-p",
                "no:cacheprovider",
            ],
            cwd=ROOT,
            env={**os.environ, "LMBATCH_FAULT_REPORT": str(report)},
        )
        rows = [json.loads(line) for line in report.read_text().splitlines()]
    lines = [
        "| fault | rows in | rows out | lost | duplicated | recomputed | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        notes = ", ".join(
            f"{k} {v}" for k, v in r.items() if k in ("restored", "ooms") and v
        )
        lines.append(
            f"| {r['fault']} | {r['rows_in']} | {r['rows_out']} | {r['lost']} | "
            f"{r['duplicated']} | {r['recomputed']} | {notes} |"
        )
    ok = all(r["lost"] == 0 and r["duplicated"] == 0 for r in rows)
    lines += [
        "",
        f"{len(rows)} faults; pytest exit status {done.returncode}; "
        + (
            "0 lost and 0 duplicated in every row."
            if ok
            else "**rows lost or duplicated**"
        ),
    ]
    append_results("faults: what each fault cost", lines)
    sys.exit(done.returncode or (0 if ok else 1))


if __name__ == "__main__":
    main()
