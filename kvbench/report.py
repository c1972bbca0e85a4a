"""The one-screen summary printed at the end of every run."""

from __future__ import annotations

import sys
from typing import Any

from kvbench import schema

COLUMNS = schema.REPORT_COLUMNS  # (header, row column, format)


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key, "ok" if key == "status" else None)
    if value is None:
        return "-"
    if key.startswith("kv_bytes"):
        value = value / 2**20
    if key == "budget" and value is None:
        value = row.get("budget_tokens")
    return fmt.format(value)


def print_rows(rows: list[dict[str, Any]]) -> None:
    """Print rows as an aligned table (markdown-compatible)."""
    if not rows:
        print("no rows")
        return
    header = [name for name, _, _ in COLUMNS]
    body = [[_cell(row, key, fmt) for _, key, fmt in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    for line in [header, ["-" * w for w in widths], *body]:
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) + " |")
    for row in rows:
        if row.get("status") == "failed":
            print(
                f"failed: {row['task']} {row['policy']} {_cell(row, 'budget', '{}')} seed={row.get('seed')}: "
                f"{row.get('reason')}"
            )


def main(argv: list[str]) -> int:
    """``python -m kvbench.report RESULTS_DIR...``: print every row of each results dir.

    Exit status 2 when a directory does not exist, 1 when a row records a failed point, else 0."""
    from pathlib import Path

    from kvbench.store import ResultStore, failed

    status = 0
    for results_dir in argv:
        if not Path(results_dir).is_dir():
            print(f"kvbench.report: error: results dir {results_dir} does not exist", file=sys.stderr)
            return 2
        rows = ResultStore(results_dir).rows()
        print_rows(rows)
        if any(failed(row) for row in rows):
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
