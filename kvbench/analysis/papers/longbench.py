"""What the LongBench paper tables share: the task subset of a row and the table columns of one model."""

from __future__ import annotations

import pandas as pd

from kvbench.analysis.names import point_label
from kvbench.metrics.longbench import CATEGORIES


def longbench_subset(task: str) -> str | None:
    """``qasper`` for a LongBench v1 task name ``longbench/qasper``; None for any other task."""
    family, _, subset = task.partition("/")
    return subset if family == "longbench" and subset in CATEGORIES else None


def table_points(lines: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The (setting, budget) points of one model's summary lines, full cache first, as (column name, lines)."""
    keys = ["setting", "budget_kind", "budget_x"]
    found = []
    for (setting, _, _), point in lines.groupby(keys, dropna=False, sort=True):
        name = point_label(setting, point["budget_label"].iloc[0])
        found.append((point["policy"].iloc[0] != "full", name, point))
    return [(name, point) for _, name, point in sorted(found, key=lambda p: p[0])]
