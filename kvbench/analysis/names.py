"""Names of settings, points and files, from a policy and its parameters (stdlib only: loggers import it)."""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Any

FORMATS = ("png", "pdf")  # the figure files ``figures.save`` writes by default (``--formats``)


def safe(name: str) -> str:
    """A file-name-safe version of a label: ``snapkv(window=32)`` -> ``snapkv_window_32``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", str(name)).strip("_")


def format_value(value: Any) -> str:
    """A parameter value as labels show it: ``{a=1,b=[1,2]}``, floats as ``%g``."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}={format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def value_text(value: Any) -> str:
    """A parameter value for a legend or a paper table: a path shows only its last part (never a local folder)."""
    if isinstance(value, str) and ("/" in value or "\\" in value):
        return PurePath(value).name
    return format_value(value)


def policy_label(
    policy: str, params: dict[str, Any] | None, display: str | None = None, short_paths: bool = False
) -> str:
    """``snapkv(window=32,kernel=7)``: the policy's display name (default: its name) and its parameters in
    field order; a marked display name is set apart, ``corm (capped, kvbench) (w=256,r=256)``. With
    ``short_paths``, a path-valued parameter shows only its last part (``value_text``)."""
    name = display or policy
    if not params:
        return name
    text = value_text if short_paths else format_value
    values = ",".join(f"{k}={text(v)}" for k, v in params.items())
    return f"{name} ({values})" if name != policy else f"{name}({values})"


def point_label(setting: str, budget_label: str) -> str:
    """Column name of one point in wide tables: ``snapkv(window=32) @ 0.3``."""
    return setting if budget_label == "-" else f"{setting} @ {budget_label}"
