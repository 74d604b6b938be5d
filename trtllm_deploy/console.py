"""What the user sees: tables, the plan before changes, and JSON where a machine reads it."""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable

from rich.console import Console
from rich.table import Table
from rich.text import Text

from trtllm_deploy.secrets import redact

out = Console(highlight=False, soft_wrap=False)
err = Console(stderr=True, highlight=False)

STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}
MARK = {"pass": "✔", "warn": "!", "fail": "✘", "skip": "–"}


def print_json(data: Any) -> None:
    sys.stdout.write(redact(json.dumps(data, indent=2, default=str)) + "\n")


def table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> Table:
    grid = Table(title=title, title_justify="left", show_lines=False)
    for column in columns:
        grid.add_column(column, overflow="fold")
    for row in rows:
        grid.add_row(*(cell if isinstance(cell, Text) else Text(redact(str(cell))) for cell in row))
    return grid


def status_cell(status: str, detail: str = "") -> Text:
    text = f"{MARK.get(status, '')} {detail}".strip()
    return Text(redact(text), style=STYLE.get(status, ""))


def size(count: float) -> str:
    """Bytes for people: 512 B, 3.2 KiB, 1.5 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"
