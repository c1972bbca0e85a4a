"""Append-only results store: ``results.jsonl`` (one row per run x task) and per-example predictions.

Every write is one whole line, under an exclusive lock (several Slurm jobs may share a results dir), after
cutting any partial last line left by a killed writer. Readers skip a partial last line. A row is keyed by its
``config_hash``; a predictions file by the same hash, keyed by example id, so a rerun resumes and never
duplicates. A row with ``status="failed"`` (a point that ran out of memory, ...) records the failure but does
not count as done: a rerun retries the point, and its finished row then supersedes the failed one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvbench.schema import Prediction, Row


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def append_line(path: Path, record: dict[str, Any], unless_key: str | None = None) -> bool:
    """Append one JSON line atomically (whole line or nothing) and fsync it.

    With ``unless_key``, nothing is written when a line with the same value for that key exists (lines with
    ``status="failed"`` do not count); the check and the write happen under one lock. Returns whether the line
    was written.
    """
    line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode()
    with _locked(path):
        if unless_key and any(
            old.get(unless_key) == record[unless_key] and not failed(old) for old in read_lines(path)
        ):
            return False
        with open(path, "ab+") as handle:
            handle.seek(0)
            data = handle.read()
            if data and not data.endswith(b"\n"):
                handle.truncate(data.rfind(b"\n") + 1)  # a line a killed writer left half-written
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
    return True


def read_lines(path: Path) -> list[dict[str, Any]]:
    """All complete JSON lines of a file (none if it does not exist)."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            print(f"kvbench: warning: {path}:{number}: damaged line skipped", file=sys.stderr)
    return records


def failed(row: dict[str, Any]) -> bool:
    """Whether a row records a failed point (``status="failed"``) rather than a result."""
    return row.get("status") == "failed"


class ResultStore:
    """``<results_dir>/results.jsonl`` plus ``<results_dir>/predictions/<config_hash>.jsonl``."""

    def __init__(self, results_dir: str | Path) -> None:
        self.root = Path(results_dir)
        self.rows_path = self.root / "results.jsonl"

    def rows(self) -> list[dict[str, Any]]:
        """One row per config hash, in order of first appearance: its result, else its latest failure."""
        latest: dict[str, dict[str, Any]] = {}
        for row in read_lines(self.rows_path):
            key = row.get("config_hash")
            if key not in latest or failed(latest[key]) or not failed(row):  # a repaired row supersedes
                latest[key] = row
        return list(latest.values())

    def has_row(self, config_hash: str) -> bool:
        """Whether the config hash has a finished (not failed) row whose predictions are all on disk."""
        row = next((r for r in self.rows() if r.get("config_hash") == config_hash and not failed(r)), None)
        if row is None:
            return False
        found = len(self.predictions(config_hash))
        if found < (row.get("n_examples") or 0):
            print(
                f"kvbench: warning: row {config_hash}: {self.predictions_path(config_hash)} holds {found} of "
                f"{row['n_examples']} examples; rerunning repairs it",
                file=sys.stderr,
            )
            return False
        return True

    def damaged(self, config_hash: str) -> bool:
        """Whether the config hash has a finished row whose predictions file lacks some of its examples."""
        return any(r.get("config_hash") == config_hash and not failed(r) for r in self.rows()) and not self.has_row(
            config_hash
        )

    def add_failure(self, row: Row) -> None:
        """Record a failed point (a rerun retries it)."""
        append_line(self.rows_path, row.to_dict())

    def add_row(self, row: Row, repair: bool = False) -> bool:
        """Append ``row`` unless a row with its config hash is already there (``repair``: always, superseding
        a row whose predictions were damaged); returns whether it was added."""
        return append_line(self.rows_path, row.to_dict(), unless_key=None if repair else "config_hash")

    @contextlib.contextmanager
    def claim(self, config_hash: str) -> Iterator[bool]:
        """Exclusive claim on computing ``config_hash``: ``predictions/<hash>.claim.lock``, held with ``flock``
        for the whole computation. Yields False when another live process holds it. The OS releases the lock
        of a killed process, so a file left behind is stale: it is taken over, and the dead pid is named."""
        path = self.predictions_path(config_hash).with_suffix(".claim.lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                handle.seek(0)
                previous = handle.read().strip()
                if previous:
                    print(f"[kvbench] {path}: stale claim of pid {previous} (not running), taken over")
                handle.seek(0)
                handle.truncate()
                handle.write(str(os.getpid()))
                handle.flush()
                yield True
            finally:
                handle.truncate(0)
                fcntl.flock(handle, fcntl.LOCK_UN)

    def predictions_path(self, config_hash: str) -> Path:
        return self.root / "predictions" / f"{config_hash}.jsonl"

    def predictions(self, config_hash: str) -> dict[str, dict[str, Any]]:
        """Predictions already on disk, by example id (the first record of an id wins)."""
        done: dict[str, dict[str, Any]] = {}
        for record in read_lines(self.predictions_path(config_hash)):
            done.setdefault(record["id"], record)
        return done

    def add_prediction(self, config_hash: str, record: Prediction) -> None:
        append_line(self.predictions_path(config_hash), record.to_dict())
