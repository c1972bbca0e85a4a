"""Experiment loggers: ``logger=none`` (default) logs nothing; others mirror each results row."""

from __future__ import annotations

from typing import Any


class NoLogger:
    """Logs nothing anywhere."""

    def log_rows(self, cfg: Any, rows: list[dict[str, Any]]) -> None:
        """Receive the rows a run wrote."""

    def finish(self) -> None:
        """Close the logger at the end of a run."""
