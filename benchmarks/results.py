"""Where benchmarks put their reports: JSON under benchmarks/results/ (or any path given), and a
console table of their rows."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def print_rows(console: Console, title: str, columns: tuple[str, ...], rows: list[dict]) -> None:
    """Rows (dicts whose values are in the order of `columns`) as a right-justified table."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)
