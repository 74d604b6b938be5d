"""docs/FAULTS.md, the fault matrix, is held to what it promises: exactly the faults of issue 16 §6,
each row filled in and naming at least one test, and every named test collected by pytest — so a
row without a test, or a test renamed or deleted under a row, fails CI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MATRIX = ROOT / "docs" / "FAULTS.md"
# Issue 16 §6's list, in its order and words.
FAULTS = ("rank killed", "mpirun killed", "hang", "crash loop", "node reboot",
          "worker unreachable before push", "disk full before/during push", "corrupted file", "image drift",
          "Ctrl-C mid-deploy", "driver disconnects")
COLUMNS = ("fault", "what the user sees", "noticed within", "left behind", "tests")
TEST_ID = re.compile(r"`(tests/test_\w+\.py)::(test_\w+)`")


def cells(line: str) -> list[str]:
    """A Markdown table row's cells; ``\\|`` is a pipe inside a cell."""
    inner = line.strip().removeprefix("|").removesuffix("|")
    return [cell.replace("\\|", "|").strip() for cell in re.split(r"(?<!\\)\|", inner)]


def table(text: str) -> list[dict[str, str]]:
    """The rows of the first table whose header is COLUMNS, as column → cell."""
    lines = text.splitlines()
    for at, line in enumerate(lines):
        if line.startswith("|") and tuple(cells(line)) == COLUMNS:
            rows = []
            for row in lines[at + 2:]:
                if not row.startswith("|"):
                    break
                found = cells(row)
                assert len(found) == len(COLUMNS), f"{MATRIX}: a row with {len(found)} cells: {row[:80]}"
                rows.append(dict(zip(COLUMNS, found, strict=True)))
            return rows
    raise AssertionError(f"{MATRIX}: no table with the columns {' | '.join(COLUMNS)}")


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    return table(MATRIX.read_text(encoding="utf-8"))


def collected(files: set[str]) -> set[str]:
    """``file::test`` for every test pytest collects from ``files`` (parameters dropped)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           *sorted(files)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, f"collecting {sorted(files)} failed:\n{done.stdout[-3000:]}{done.stderr}"
    return {line.split("[", 1)[0] for line in done.stdout.splitlines() if "::" in line}


def test_the_rows_are_exactly_the_issues_faults(rows):
    assert tuple(row["fault"] for row in rows) == FAULTS


def test_every_row_says_what_is_seen_when_and_what_is_left(rows):
    for row in rows:
        for column in COLUMNS[1:4]:
            assert row[column], f"{MATRIX}: {row['fault']!r} says nothing under {column!r}"


def test_every_row_names_a_test_and_every_named_test_exists(rows):
    named = {row["fault"]: TEST_ID.findall(row["tests"]) for row in rows}
    untested = [fault for fault, tests in named.items() if not tests]
    assert not untested, f"{MATRIX}: rows without a test: {', '.join(untested)}"
    files = {file for tests in named.values() for file, _ in tests}
    absent = sorted(file for file in files if not (ROOT / file).is_file())
    assert not absent, f"{MATRIX} names test files that do not exist: {', '.join(absent)}"
    there = collected(files)
    missing = [f"{fault}: {file}::{test}" for fault, tests in named.items() for file, test in tests
               if f"{file}::{test}" not in there]
    assert not missing, f"{MATRIX} names tests pytest does not collect:\n  " + "\n  ".join(missing)


def test_the_readme_links_the_matrix():
    assert "(docs/FAULTS.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("text, expected", [
    pytest.param("| a | b `x \\| y` | c |", ["a", "b `x | y`", "c"], id="escaped-pipe"),
    pytest.param("|a|b|", ["a", "b"], id="tight"),
])
def test_cells_of_a_row(text, expected):
    assert cells(text) == expected
