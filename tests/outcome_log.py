"""A pytest plugin (loaded by conftest.py): with ``DUNE_TEST_REPORT=path``, each test's outcome, and
a failure's message, is appended to that JSON-lines file as the test ends. ``make gpu-check`` stops
its test part at a time limit, and pytest writes its own summary and JUnit file only at the very
end. No imports beyond the standard library, so it loads in a bare interpreter."""

from __future__ import annotations

import json
import os

import pytest


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """One line per finished test (a setup failure or skip included)."""
    path = os.environ.get("DUNE_TEST_REPORT")
    if not path or not (report.when == "call" or report.failed or report.skipped):
        return
    record = {"test": report.nodeid.split("::", 1)[-1], "outcome": report.outcome, "seconds": report.duration}
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)  # the exception line, e.g. "AssertionError: …"
        record["message"] = crash.message if crash is not None else str(report.longrepr).splitlines()[-1]
        record["details"] = str(report.longrepr)[-3000:]
    elif report.skipped and isinstance(report.longrepr, tuple):
        record["message"] = report.longrepr[-1]
    with open(path, "a") as log:
        log.write(json.dumps(record) + "\n")
