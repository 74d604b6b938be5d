"""Under ``CI=true`` (as GitHub Actions, GitLab CI and .ci/run set it) a skipped test is a failure:
a CI machine that lacks what a test needs must say so, not pass without running it. Elsewhere a
skip stays a skip, with its reason, so a developer's machine without Docker can run the rest.

conftest.py imports the hook below; ``-p ci_skips`` loads it on its own (tests/test_ci.py)."""

from __future__ import annotations

import os

import pytest


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail") or not under_ci():
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI={os.environ.get('CI')}, which CI does not allow: {reason}. "
                       "Make the CI machine provide what the test needs (.ci/run installs it).")
