"""LESS (2402.09398): the share of the full - base gap that LESS recovers at the same budget."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from kvbench.analysis.figures import Output, series_colors, task_title
from kvbench.analysis.load import MACRO, predictions, summary
from kvbench.analysis.names import safe

# LESS's ``base`` parameter -> the kvbench policy that holds the same sparse set.
LESS_BASES = {"lambda": "streaming_llm"}


def _matching_base(less: pd.Series, lines: pd.DataFrame) -> pd.Series | None:
    """The line LESS is compared with: its sparse base policy (``base`` param, H2O by default; Lambda is
    StreamingLLM's cache) at the same task, budget and variant, preferring the one whose parameters LESS shares
    (``recent_fraction``, ...)."""
    params = less["policy_params"] if isinstance(less["policy_params"], dict) else {}
    base = params.get("base", "h2o")
    same = lines[
        (lines["policy"] == LESS_BASES.get(base, base))
        & (lines["task"] == less["task"])
        & (lines["budget_kind"] == less["budget_kind"])
        & (lines["budget_label"] == less["budget_label"])
        & (lines["variant"] == less["variant"])
    ]
    shared = [
        i
        for i, p in zip(same.index, same["policy_params"], strict=True)
        if all(params.get(k) == v for k, v in (p or {}).items())
    ]
    if shared:
        return same.loc[shared[0]]
    return same.iloc[0] if len(same) else None


def _example_scores(df: pd.DataFrame, line: pd.Series) -> dict[str, float]:
    """Per-example scores (0-1) of the rows behind a summary line, by example id."""
    rows = df[
        (df["model"] == line["model"])
        & (df["task"] == line["task"])
        & (df["setting"] == line["setting"])
        & (df["budget_label"] == line["budget_label"])
    ]
    return {
        record["id"]: record["score"]
        for _, row in rows.iterrows()
        for record in predictions(row)
        if record.get("score") is not None
    }


def _paired(df: pd.DataFrame, *lines: pd.Series) -> list[float] | None:
    """100 x the mean score of each line over the examples they all have (None when they share none)."""
    scores = [_example_scores(df, line) for line in lines]
    shared = set.intersection(*(set(s) for s in scores))
    ordered = sorted(shared)  # a fixed summation order: a set's order changes with PYTHONHASHSEED
    return [100 * float(np.mean([s[i] for i in ordered])) for s in scores] if shared else None


def less_gap_table(lines: pd.DataFrame, df: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per model, task (and average) and budget: full, base and LESS scores, LESS - base, and the share of the gap
    that LESS recovers, ``(less - base) / (full - base)`` in percent (NaN when the base is not below the full
    cache: there is no gap to recover).

    With the rows ``df``, the three scores of a task are means over the examples all three were run on (a LESS
    setting run at fewer lengths is compared on those lengths only), and the average is the mean of the
    per-task values; without it, the summary lines' scores are used as they are."""
    rows = []
    for _, less in lines[lines["policy"] == "less"].iterrows():
        if df is not None and less["task"] == MACRO:
            continue
        per_model = lines[lines["model"] == less["model"]]
        base = _matching_base(less, per_model)
        same = (per_model["task"] == less["task"]) & (per_model["variant"] == less["variant"])
        full = per_model[same & (per_model["policy"] == "full")]
        if base is None or full.empty:
            continue
        scores = [full["score"].iloc[0], base["score"], less["score"]]
        if df is not None:
            scores = _paired(df, full.iloc[0], base, less)
            if scores is None:
                continue
        rows.append({"model": less["model"], "task": less["task"], "less": less["setting"]})
        rows[-1].update(budget=less["budget_label"], base=base["setting"])
        rows[-1].update(dict(zip(("full", "base_score", "less_score"), scores, strict=True)))
    table = pd.DataFrame(rows, columns=["model", "task", "less", "budget", "base", "full", "base_score", "less_score"])
    if df is not None and not table.empty:
        macro = []
        for (model, setting, budget, base), group in table.groupby(["model", "less", "budget", "base"], sort=False):
            per_model = lines[(lines["model"] == model) & (lines["task"] != MACRO)]
            if len(group) > 1 and set(group["task"]) == set(per_model["task"]):
                means = group[["full", "base_score", "less_score"]].mean()
                macro.append({"model": model, "task": MACRO, "less": setting, "budget": budget, "base": base})
                macro[-1].update(means.to_dict())
        table = pd.concat([table, pd.DataFrame(macro, columns=table.columns)], ignore_index=True)
    gap = table["full"] - table["base_score"]
    table["less_minus_base"] = table["less_score"] - table["base_score"]
    table["gap_recovered_pct"] = (100 * table["less_minus_base"] / gap).where(gap > 1e-9)
    return table


def less_gap_recovered(df: pd.DataFrame, lines: pd.DataFrame | None = None) -> Output:
    """LESS (2402.09398, e.g. "recovers 41.4% of the ROUGE-1 drop" of H2O): the share of the full - H2O gap that
    LESS closes at the same budget, per task and on the macro average; bars per (LESS setting, budget)."""
    lines = summary(df) if lines is None else lines
    table = less_gap_table(lines, df)
    out: Output = {}
    for model, per_model in table.groupby("model", sort=True):
        tasks = list(dict.fromkeys(t for t in per_model["task"] if t != MACRO))
        tasks += [MACRO] if (per_model["task"] == MACRO).any() else []
        bars = list(dict.fromkeys(zip(per_model["less"], per_model["budget"], strict=True)))
        colors = series_colors([f"{s} @ {b}" for s, b in bars])
        fig = Figure(figsize=(max(6, 1.2 * len(tasks) * max(1, len(bars)) / 2 + 2), 4.8), layout="constrained")
        ax = fig.subplots()
        width = 0.8 / max(1, len(bars))
        for i, (setting, budget) in enumerate(bars):
            values = per_model[(per_model["less"] == setting) & (per_model["budget"] == budget)]
            by_task = dict(zip(values["task"], values["gap_recovered_pct"], strict=True))
            heights = [by_task.get(t, math.nan) for t in tasks]
            label = f"{setting} @ {budget}"
            ax.bar(
                np.arange(len(tasks)) + (i - (len(bars) - 1) / 2) * width,
                heights,
                width,
                label=label,
                color=colors[label],
            )
        ax.axhline(0, color="black", linewidth=0.8)
        ax.axhline(100, color="black", linestyle="--", linewidth=0.8, label="full cache (100%)")
        ax.set_xticks(range(len(tasks)), [task_title(t).removeprefix("longbench/") for t in tasks], rotation=30)
        ax.set_ylabel("gap to the full cache recovered by LESS (%)")
        ax.set_title(f"{model}: (LESS - base) / (full - base), base = {', '.join(sorted(set(per_model['base'])))}")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        out[f"fig_less_gap_recovered__{safe(model)}"] = fig
        out[f"table_less_gap_recovered__{safe(model)}"] = per_model.drop(columns="model").set_index("task")
    return out
