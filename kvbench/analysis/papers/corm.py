"""CORM (2404.15949): its compression vs sequence length (Fig. 4) and its LongBench tables (Tables 1-2)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from kvbench.analysis.figures import Output, series_colors
from kvbench.analysis.load import predictions, summary
from kvbench.analysis.names import safe
from kvbench.analysis.papers.longbench import longbench_subset, table_points
from kvbench.metrics.longbench import CATEGORIES, category_means, macro_average

# LongBench v1's Chinese tasks (the rest, code included, make up the English tables of the LongBench README).
ZH_TASKS = frozenset({"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"})


def corm_compression_vs_length(df: pd.DataFrame, lines: pd.DataFrame | None = None) -> Output:
    """CORM (Fig. 4 of 2404.15949): the KV fraction CORM keeps vs prompt length, per example, with binned means;
    CORM has no budget, so its compression is an outcome that grows with the sequence."""
    out: Output = {}
    for model, rows in df[df["policy"] == "corm"].groupby("model", sort=True):
        colors = series_colors(list(rows["setting"]))
        fig = Figure(figsize=(7, 5), layout="constrained")
        ax = fig.subplots()
        drawn = False
        for setting, point in rows.groupby("setting", sort=True):
            records = [r for _, row in point.iterrows() for r in predictions(row)]
            xy = np.asarray([(r["n_prompt_tokens"], r["kv_kept_fraction"]) for r in records], dtype=float)
            if xy.size == 0:
                continue
            drawn = True
            ax.scatter(xy[:, 0], xy[:, 1], s=10, alpha=0.35, color=colors[setting])
            edges = np.unique(np.quantile(xy[:, 0], np.linspace(0, 1, min(8, len(xy)) + 1)))
            which = np.clip(np.digitize(xy[:, 0], edges[1:-1]), 0, max(len(edges) - 2, 0))
            centers = [xy[which == b, 0].mean() for b in np.unique(which)]
            means = [xy[which == b, 1].mean() for b in np.unique(which)]
            ax.plot(centers, means, marker="o", color=colors[setting], label=f"{setting} (binned mean)")
        if not drawn:
            continue
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("KV kept fraction (achieved)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"{model}: CORM compression vs sequence length")
        ax.legend(fontsize=8)
        out[f"fig_corm_compression_vs_length__{safe(model)}"] = fig
    return out


def corm_longbench_table(df: pd.DataFrame, lines: pd.DataFrame | None = None) -> Output:
    """CORM's LongBench layout (Tables 1-2 of 2404.15949): per task, per category, overall (EN, ZH, all),
    one column per (policy, budget); overall = mean of the category means, as the LongBench README averages."""
    lines = summary(df) if lines is None else lines
    out: Output = {}
    for model, per_model in lines.groupby("model", sort=True):
        per_model = per_model[per_model["task"].map(longbench_subset).notna()]
        if per_model.empty:
            continue
        present = set(per_model["task"].map(longbench_subset))
        categories = list(dict.fromkeys(CATEGORIES[t] for t in CATEGORIES if t in present))
        columns = {}
        for name, point in table_points(per_model):
            scores = {longbench_subset(t): s for t, s in zip(point["task"], point["score"], strict=True)}
            column: dict[str, float] = {}
            means = category_means(scores)
            for category in categories:
                for task in (t for t in CATEGORIES if CATEGORIES[t] == category and t in present):
                    column[task] = scores.get(task, math.nan)
                column[f"{category} (avg)"] = means.get(category, math.nan)
            for label, keep in (("EN", lambda t: t not in ZH_TASKS), ("ZH", lambda t: t in ZH_TASKS)):
                if any(keep(t) for t in present):
                    chosen = {t: s for t, s in scores.items() if keep(t)}
                    column[f"Overall {label}"] = macro_average(category_means(chosen).values()) if chosen else math.nan
            column["Overall"] = macro_average(means.values())
            columns[name] = column
        table = pd.DataFrame(columns)
        table.index.name = "task"
        out[f"table_corm_longbench__{safe(model)}"] = table
    return out
