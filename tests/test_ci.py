"""The suite's own rules, run for real in a pytest of their own: under CI=true a skipped test
fails, and every test runs under a time limit (pytest-timeout)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


def pytest_on(folder: Path, source: str, *args: str, ci: str | None) -> subprocess.CompletedProcess:
    (folder / "test_one.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": str(TESTS)}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-c", str(ROOT / "pytest.ini"), "--rootdir", str(folder), "-p", "ci_skips",
                           *args, str(folder / "test_one.py")],
                          capture_output=True, text=True, timeout=120, cwd=folder, env=env)


SKIPS = """
import pytest

@pytest.mark.skipif(True, reason="no frobnicator on this machine")
def test_marked():
    pass

def test_inside():
    pytest.skip("no widget here")

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_to_fail():
    assert False
"""


def test_a_skip_fails_under_ci_and_says_why(tmp_path):
    done = pytest_on(tmp_path, SKIPS, "-rA", ci="true")
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    assert "no frobnicator on this machine" in out and "no widget here" in out, out
    # A skip mark fails in setup (an error), pytest.skip() in the test (a failure).
    assert "skipped under CI=true" in out and "1 failed, 1 xfailed, 1 error" in out, out


def test_a_skip_stays_a_skip_off_ci(tmp_path):
    for ci in (None, "false", ""):
        done = pytest_on(tmp_path, SKIPS, ci=ci)
        assert done.returncode == 0 and "2 skipped" in done.stdout, (ci, done.stdout + done.stderr)


def test_the_suite_runs_under_a_time_limit(pytestconfig, tmp_path):
    assert float(pytestconfig.getini("timeout") or 0) > 0  # the limit of this very run
    hang = "import os\n\ndef test_hangs():\n    os.read(os.pipe()[0], 1)  # nobody ever writes\n"
    done = pytest_on(tmp_path, hang, "-o", "timeout=2", ci=None)
    assert done.returncode == 1 and "Timeout" in done.stdout + done.stderr, done.stdout + done.stderr
