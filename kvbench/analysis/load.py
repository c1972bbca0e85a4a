"""Read results rows back: one DataFrame for every ``results.jsonl`` under a directory, summaries with CIs.

A row is one (model, policy, budget, task, seed, ...) run, keyed by ``config_hash``; a rerun that wrote a row
again (a copied results dir, a second store) is de-duplicated to the latest timestamp. Per-example scores come
from ``predictions/<config_hash>.jsonl`` beside the row's ``results.jsonl``. The CIs are 95% percentile
bootstraps of 100 x the mean score (``bootstrap_means``/``bootstrap_ci``: the one implementation in kvbench).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvbench import schema
from kvbench.analysis.names import policy_label
from kvbench.labels import display_name
from kvbench.store import ResultStore, failed, read_lines

MACRO = "average"  # task name of the macro-average rows that ``summary`` adds
N_RESAMPLES = 1000
SEED = 0

# Defaults for row keys an older or partial row may lack, so every column below exists (kvbench/schema.py).
ROW_DEFAULTS: dict[str, Any] = schema.ROW_DEFAULTS
NUMERIC = schema.NUMERIC
# One point of a curve: a model, a policy configuration (+ protocol variant) and a budget.
POINT = ["model", "setting", "budget_kind", "budget_x"]
EFFICIENCY = {column: "mean" for column in schema.EFFICIENCY}


def row_display_name(row: pd.Series | dict[str, Any]) -> str:
    """A row's display name: its ``label`` column, or (rows written before it existed) the same rule rebuilt."""
    label = row.get("label")
    if isinstance(label, str) and label:
        return label
    budgeted = pd.notna(row.get("budget")) or pd.notna(row.get("budget_tokens"))
    return display_name(row["policy"], row.get("policy_params"), bool(budgeted))


def _budget(row: pd.Series) -> tuple[str, float, str]:
    """(kind, x, label) of a row's budget: a kept fraction, a token count, or none (full / data-dependent)."""
    if pd.notna(row["budget"]):
        return "fraction", float(row["budget"]), f"{float(row['budget']):g}"
    if pd.notna(row["budget_tokens"]):
        return "tokens", float(row["budget_tokens"]), f"{int(row['budget_tokens'])} tok"
    return "none", math.nan, "-"


def _variant(row: pd.Series) -> str:
    """What besides the policy changes the numbers: a non-default protocol or prefill eviction."""
    parts = []
    if row["protocol"] not in (None, "official"):
        parts.append(f"protocol={row['protocol']}")
    if row["prefill_eviction"] not in (None, "whole"):
        parts.append(f"prefill_eviction={row['prefill_eviction']}")
    return ",".join(parts)


def load(results_dir: str | Path) -> pd.DataFrame:
    """Every row of every ``results.jsonl`` under ``results_dir`` (searched recursively), one per config hash.

    Added columns: ``results_dir`` (where the row and its predictions live), ``display_name`` (the policy's
    name with its extension/approximation mark), ``policy_label``, ``variant``,
    ``setting`` (label + variant), ``budget_kind`` (fraction | tokens | none), ``budget_x`` (the budget as a
    number, NaN for none) and ``budget_label``.
    """
    root = Path(results_dir)
    paths = sorted(root.rglob("results.jsonl")) if root.is_dir() else [root] if root.is_file() else []
    records = [
        {**ROW_DEFAULTS, **row, "results_dir": str(path.parent)}
        for path in paths
        for row in read_lines(path)
        if not failed(row)  # a failed point has no numbers; `python -m kvbench.report` lists it
    ]
    columns = [
        *ROW_DEFAULTS,
        "results_dir",
        "display_name",
        "policy_label",
        "variant",
        "setting",
        "budget_kind",
        "budget_x",
    ]
    if not records:
        return pd.DataFrame(columns=[*columns, "budget_label"])
    df = pd.DataFrame(records)
    for column in NUMERIC:
        df[column] = pd.to_numeric(df[column], errors="coerce").astype(float)
    df["_time"] = pd.to_datetime(df["timestamp"], utc=True, errors="coerce", format="ISO8601")
    df = df.sort_values("_time", kind="stable", na_position="first").drop_duplicates("config_hash", keep="last")
    df = df.drop(columns="_time")
    df["display_name"] = [row_display_name(row) for _, row in df.iterrows()]
    df["policy_label"] = [
        policy_label(p, q, d, short_paths=True)  # no machine paths in any table or legend: a path's last part
        for p, q, d in zip(df["policy"], df["policy_params"], df["display_name"], strict=True)
    ]
    df["variant"] = df.apply(_variant, axis=1)
    df["setting"] = [
        f"{label} [{v}]" if v else label for label, v in zip(df["policy_label"], df["variant"], strict=True)
    ]
    budgets = df.apply(_budget, axis=1, result_type="expand")
    df["budget_kind"], df["budget_x"], df["budget_label"] = budgets[0], budgets[1].astype(float), budgets[2]
    order = ["model", "task", "setting", "budget_kind", "budget_x", "seed"]
    return df.sort_values(order, kind="stable", na_position="first").reset_index(drop=True)


def predictions(row: pd.Series | dict[str, Any]) -> list[dict[str, Any]]:
    """The per-example records of a row (first record of an id wins, as the store reads them)."""
    return list(ResultStore(row["results_dir"]).predictions(row["config_hash"]).values())


def example_scores(row: pd.Series | dict[str, Any]) -> np.ndarray:
    """Per-example scores in [0, 1] of a row; empty when its predictions file is missing."""
    return np.asarray([record["score"] for record in predictions(row) if record.get("score") is not None], float)


def bootstrap_means(scores: np.ndarray, n: int = N_RESAMPLES, rng: np.random.Generator | None = None) -> np.ndarray:
    """``n`` bootstrap resamples of 100 x the mean of ``scores`` (examples drawn with replacement)."""
    rng = np.random.default_rng(SEED) if rng is None else rng
    return 100 * scores[rng.integers(0, scores.size, size=(n, scores.size))].mean(axis=1)


def bootstrap_ci(scores: np.ndarray, n: int = N_RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """95% percentile-bootstrap interval of 100 x the mean; NaN when there are no scores."""
    if scores.size == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(bootstrap_means(scores, n, np.random.default_rng(seed)), [2.5, 97.5])
    return float(lo), float(hi)


def _first(values: pd.Series) -> Any:
    return values.iloc[0]


def summary(df: pd.DataFrame, n: int = N_RESAMPLES, seed: int = SEED) -> pd.DataFrame:
    """One line per model x task x setting x budget: score, its 95% bootstrap CI and the efficiency columns.

    Rows that differ only in seed are pooled: ``score`` is the mean of their scores, the CI resamples their
    examples together. For a model with several tasks, ``task == "average"`` lines hold the macro average over
    tasks for the points that have every task of the model; its CI resamples each task's examples apart.
    """
    columns = [
        "model",
        "setting",
        "task",
        "budget_kind",
        "budget_x",
        "budget_label",
        "policy",
        "display_name",
        "policy_label",
        "policy_params",
        "variant",
        "kv_masked",
        "score",
        "ci_low",
        "ci_high",
        "n_examples",
        "n_runs",
        *EFFICIENCY,
    ]
    if df.empty:
        return pd.DataFrame(columns=columns)
    keys = ["model", "task", "setting", "budget_kind", "budget_x"]
    lines, resamples = [], {}
    for key, group in df.groupby(keys, dropna=False, sort=True):
        scores = np.concatenate([example_scores(row) for _, row in group.iterrows()])
        lo, hi = bootstrap_ci(scores, n, seed)
        line = dict(zip(keys, key, strict=True))
        line.update(
            budget_label=group["budget_label"].iloc[0],
            policy=group["policy"].iloc[0],
            display_name=group["display_name"].iloc[0],
            policy_label=group["policy_label"].iloc[0],
            policy_params=group["policy_params"].iloc[0],
            variant=group["variant"].iloc[0],
            kv_masked=bool(group["kv_masked"].astype(bool).any()),
            score=float(group["score"].mean()),
            ci_low=lo,
            ci_high=hi,
            n_examples=int(group["n_examples"].sum()),
            n_runs=len(group),
            **{column: float(group[column].mean()) for column in EFFICIENCY},
        )
        lines.append(line)
        resamples[(*key[:4], line["budget_label"])] = scores
    out = pd.DataFrame(lines)
    macro = _macro(out, resamples, n, seed)
    out = pd.concat([out, macro], ignore_index=True) if not macro.empty else out
    numeric = ["budget_x", "score", "ci_low", "ci_high", *EFFICIENCY]
    out[numeric] = out[numeric].astype(float)
    out["_macro"] = out["task"] == MACRO
    out = out.sort_values(["model", "_macro", "task", "setting", "budget_kind", "budget_x"], kind="stable")
    return out.drop(columns="_macro").reset_index(drop=True)[columns]


def _macro(lines: pd.DataFrame, scores: dict[tuple, np.ndarray], n: int, seed: int) -> pd.DataFrame:
    """Macro average over a model's tasks, for the points that have all of them."""
    out = []
    for model, per_model in lines.groupby("model", sort=True):
        tasks = sorted(per_model["task"].unique())
        if len(tasks) < 2:
            continue
        for _, point in per_model.groupby(["setting", "budget_kind", "budget_x"], dropna=False, sort=True):
            if sorted(point["task"]) != tasks:
                continue
            first = point.iloc[0].to_dict()
            rng = np.random.default_rng(seed)
            samples = [
                scores[(model, task, first["setting"], first["budget_kind"], first["budget_label"])] for task in tasks
            ]
            lo = hi = math.nan
            if all(s.size for s in samples):
                macro = np.mean([bootstrap_means(s, n, rng) for s in samples], axis=0)
                lo, hi = (float(v) for v in np.percentile(macro, [2.5, 97.5]))
            first.update(
                task=MACRO,
                kv_masked=bool(point["kv_masked"].any()),
                score=float(point["score"].mean()),
                ci_low=lo,
                ci_high=hi,
                n_examples=int(point["n_examples"].sum()),
                n_runs=int(point["n_runs"].sum()),
                **{column: float(point[column].mean()) for column in EFFICIENCY},
            )
            out.append(first)
    return pd.DataFrame(out, columns=lines.columns)


def efficiency(df: pd.DataFrame) -> pd.DataFrame:
    """One line per model x setting x budget: KV kept, KV bytes, peak memory and speed, averaged over tasks."""
    if df.empty:
        columns = ["budget_label", "policy", "display_name", "policy_label", "policy_params", "variant", "kv_masked"]
        columns.append("n_tasks")
        return pd.DataFrame(columns=[*POINT, *columns, *EFFICIENCY])
    grouped = df.groupby(POINT, dropna=False, sort=True)
    first = dict.fromkeys(
        ["budget_label", "policy", "display_name", "policy_label", "policy_params", "variant"], _first
    )
    out = grouped.agg({**first, "kv_masked": "any", "task": "nunique", **EFFICIENCY}).reset_index()
    return out.rename(columns={"task": "n_tasks"})
