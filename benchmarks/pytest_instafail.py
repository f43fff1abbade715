"""A pytest plugin for short GPU leases: a failure's traceback is printed the moment
the test fails, so a run cut off by its time limit still says why
(``benchmarks/gpu_check.sh`` loads it with ``-p pytest_instafail``)."""

import os
import sys


def pytest_runtest_logreport(report) -> None:
    # Under pytest-xdist the controller receives every worker's reports: print there.
    if report.failed and "PYTEST_XDIST_WORKER" not in os.environ:
        sys.stderr.write(f"\nFAILED {report.nodeid} ({report.when})\n")
        sys.stderr.write(f"{report.longreprtext}\n")
        sys.stderr.flush()
