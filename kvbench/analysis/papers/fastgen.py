"""FastGen (2310.01801): score vs the KV fraction kept across its recovery ratios T (Table 1 / Fig. 5)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from kvbench.analysis.figures import Output, figure_legend, panel_grid, policy_color, short_labels, task_title
from kvbench.analysis.load import MACRO, summary
from kvbench.analysis.names import policy_label, safe

# FastGen's recovery ratio T, under either name a policy may give it.
FASTGEN_T = ("recovery", "T")


def _fastgen_t(params: Any) -> float | None:
    params = params if isinstance(params, dict) else {}
    return next((float(params[k]) for k in FASTGEN_T if params.get(k) is not None), None)


def fastgen_tradeoff(df: pd.DataFrame, lines: pd.DataFrame | None = None) -> Output:
    """FastGen (Table 1 / Fig. 5 of 2310.01801): score vs the KV fraction kept (achieved) across FastGen's
    recovery ratios T, against the fixed-budget (non-adaptive) policies over their budgets; a panel per task
    (where FastGen has two T at least) + average."""
    lines = summary(df) if lines is None else lines
    out: Output = {}
    for model, per_model in lines.groupby("model", sort=True):
        fastgen = per_model[per_model["policy"] == "fastgen"]
        if fastgen.empty:
            continue
        others = per_model[(per_model["policy"] != "full") & (per_model["budget_kind"] != "none")]
        series: list[tuple[str, pd.DataFrame, bool]] = []
        base = fastgen.assign(
            _t=[_fastgen_t(p) for p in fastgen["policy_params"]],
            _series=[
                policy_label("fastgen", {k: v for k, v in (p or {}).items() if k not in FASTGEN_T})
                + (f" [{v}]" if v else "")
                for p, v in zip(fastgen["policy_params"], fastgen["variant"], strict=True)
            ],
        )
        series += [(name, points, True) for name, points in base.groupby("_series", sort=True)]
        labels = short_labels(per_model)
        series += [(labels[name], points, False) for name, points in others.groupby("setting", sort=True)]
        tasks = [t for t in dict.fromkeys(per_model["task"]) if t != MACRO]
        panels = tasks + ([MACRO] if (per_model["task"] == MACRO).any() else [])
        panels = [t for t in panels if (fastgen["task"] == t).sum() >= 2]  # a trade-off needs two T at least
        if not panels:
            print(f"fig_fastgen_tradeoff__{safe(model)}: not drawn, no task has FastGen at two T")
            continue
        fig, axes = panel_grid(len(panels), width=4.5, height=3.6)
        for ax, task in zip(axes, panels, strict=True):
            full = per_model[(per_model["policy"] == "full") & (per_model["task"] == task)]
            if not full.empty:
                ax.axhline(full["score"].mean(), color="black", linestyle="--", linewidth=1.2, label="full cache")
            for name, points, adaptive in series:
                points = points[points["task"] == task].assign(_x=lambda p: p["kv_kept_fraction"])
                points = points.sort_values("_x")
                if points.empty:
                    continue
                yerr = np.vstack([points["score"] - points["ci_low"], points["ci_high"] - points["score"]])
                yerr = None if np.isnan(yerr).all() else np.nan_to_num(yerr)
                ax.errorbar(
                    points["_x"],
                    points["score"],
                    yerr=yerr,
                    marker="D" if adaptive else "o",
                    linestyle="-" if adaptive else ":",
                    color=policy_color(points["policy"].iloc[0]),
                    capsize=2,
                    label=name + (" (adaptive)" if adaptive else ""),
                )
                if adaptive:
                    for i, (_, point) in enumerate(points.iterrows()):
                        if point["_t"] is not None and not pd.isna(point["_t"]):
                            offset = (4, 6 if i % 2 == 0 else -10)  # alternate above/below: close T's overlap
                            ax.annotate(
                                f"T={point['_t']:g}",
                                (point["_x"], point["score"]),
                                xytext=offset,
                                textcoords="offset points",
                                fontsize=6,
                            )
            ax.set_xlabel("KV kept fraction (achieved)")
            ax.set_ylabel("score")
            ax.set_xlim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.set_title(task_title(task), fontsize=10)
        fig.suptitle(f"{model}: FastGen's adaptive compression vs fixed-budget policies")
        figure_legend(fig, axes)
        out[f"fig_fastgen_tradeoff__{safe(model)}"] = fig
    return out
