"""Synthetic retrieval (passkey, needle): scores by context length, and the needle-in-a-haystack heatmaps."""

from __future__ import annotations

import math
import textwrap

import pandas as pd
from matplotlib.figure import Figure

from kvbench.analysis.figures import Output, short_labels
from kvbench.analysis.load import predictions
from kvbench.analysis.names import point_label, safe


def scores_by_length(df: pd.DataFrame, lines: pd.DataFrame | None = None) -> Output:
    """Synthetic retrieval (passkey, needle) by context length: a row per (policy, budget), a column per
    (task, length), each cell ``score (kept fraction)`` over that length's examples, per model."""
    records = []
    for _, row in df[df["task_family"] == "synthetic"].iterrows():
        point = point_label(row["setting"], row["budget_label"])
        for record in predictions(row):
            length = (record.get("meta") or {}).get("length")
            if length is not None and record.get("score") is not None:
                kept = record.get("kv_kept_fraction", math.nan)
                budgeted = row["policy"] != "full"
                records.append((row["model"], budgeted, point, row["task"], int(length), record["score"], kept))
    out: Output = {}
    if not records:
        return out
    frame = pd.DataFrame(records, columns=["model", "budgeted", "point", "task", "length", "score", "kept"])
    for model, per_model in frame.groupby("model", sort=True):
        cells = per_model.groupby(["budgeted", "point", "task", "length"], sort=True)[["score", "kept"]].mean()
        cells["cell"] = [f"{100 * s:.0f} ({k:.2f})" for s, k in zip(cells["score"], cells["kept"], strict=True)]
        table = cells["cell"].unstack(["task", "length"]).droplevel("budgeted").sort_index(axis=1).fillna("-")
        table.columns = [f"{task} {length // 1024}k" for task, length in table.columns]
        table.index.name = "setting"
        out[f"table_scores_by_length__{safe(model)}"] = table
    return out


def needle_heatmaps(df: pd.DataFrame, lines: pd.DataFrame | None = None) -> Output:
    """The needle-in-a-haystack heatmap per model and synthetic task: depth (rows) x context length (columns),
    colour = mean score of that cell's examples, one panel per (policy, budget), the full cache first."""
    out: Output = {}
    synthetic = df[df["task_family"] == "synthetic"] if "task_family" in df else df.iloc[0:0]
    for (model, task), rows in synthetic.groupby(["model", "task"], sort=True):
        cells = []
        labels = short_labels(rows)
        for _, row in rows.iterrows():
            point = point_label(labels[row["setting"]], row["budget_label"])
            for record in predictions(row):
                meta = record.get("meta") or {}
                if record.get("score") is not None and "length" in meta and "depth" in meta:
                    budgeted = row["policy"] != "full"
                    cells.append((budgeted, point, int(meta["length"]), float(meta["depth"]), float(record["score"])))
        if not cells:
            continue
        frame = pd.DataFrame(cells, columns=["budgeted", "point", "length", "depth", "score"])
        means = frame.groupby(["budgeted", "point", "depth", "length"], sort=True)["score"].mean()
        points = list(dict.fromkeys(p for _, p in sorted({(b, p) for b, p, _, _ in means.index})))
        lengths, depths = sorted(frame["length"].unique()), sorted(frame["depth"].unique())
        ncols = min(6, len(points))
        nrows = math.ceil(len(points) / ncols)
        fig = Figure(figsize=(1.9 * ncols + 1.2, (1.3 + 0.08 * len(depths)) * nrows + 1.0), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True).ravel().tolist()
        for ax in axes[len(points) :]:
            ax.set_visible(False)
        axes = axes[: len(points)]
        image = None
        for ax, point in zip(axes, points, strict=True):
            grid = frame[frame["point"] == point].pivot_table("score", "depth", "length", aggfunc="mean")
            grid = grid.reindex(index=depths, columns=lengths)
            image = ax.imshow(100 * grid.to_numpy(float), vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=6)
            ax.tick_params(axis="x", labelsize=7, labelbottom=True)
            ax.set_title(textwrap.fill(point, 26), fontsize=6.5)
        fig.supxlabel("context length (tokens)", fontsize=9)
        fig.supylabel("needle depth (fraction of the input)", fontsize=9)
        fig.colorbar(image, ax=axes, label="score (%)", shrink=min(0.9, 3 / nrows), aspect=30)
        fig.suptitle(f"{model}: {task}, score by needle depth and context length")
        out[f"fig_needle_heatmap__{safe(model)}__{safe(task)}"] = fig
    return out
