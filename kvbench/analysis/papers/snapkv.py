"""SnapKV's LongBench table (README of FasterDecoding/SnapKV)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from kvbench.analysis.figures import Output
from kvbench.analysis.load import summary
from kvbench.analysis.names import safe
from kvbench.analysis.papers.longbench import longbench_subset, table_points

# The SnapKV paper's LongBench table: its 16 English/code tasks, its column names, its order.
SNAPKV_COLUMNS = {
    "narrativeqa": "NQA",
    "qasper": "Qsp",
    "multifieldqa_en": "MFen",
    "hotpotqa": "HQA",
    "2wikimqa": "2WQA",
    "musique": "Mus",
    "gov_report": "GovR",
    "qmsum": "QMS",
    "multi_news": "MNews",
    "trec": "TREC",
    "triviaqa": "TQA",
    "samsum": "SAMS",
    "passage_count": "PCnt",
    "passage_retrieval_en": "PRe",
    "lcc": "Lcc",
    "repobench-p": "RB-P",
}


def snapkv_longbench_table(df: pd.DataFrame, lines: pd.DataFrame | None = None) -> Output:
    """SnapKV's LongBench table (README of FasterDecoding/SnapKV): a row per setting ("All KV", then each
    policy at each fixed budget), its 16 English/code tasks as columns, their mean and the KV fraction kept."""
    lines = summary(df) if lines is None else lines
    out: Output = {}
    for model, per_model in lines.groupby("model", sort=True):
        per_model = per_model[per_model["task"].map(longbench_subset).isin(list(SNAPKV_COLUMNS))]
        if per_model.empty:
            continue
        present = [t for t in SNAPKV_COLUMNS if t in set(per_model["task"].map(longbench_subset))]
        rows = {}
        for name, point in table_points(per_model):
            scores = {longbench_subset(t): s for t, s in zip(point["task"], point["score"], strict=True)}
            row = {SNAPKV_COLUMNS[t]: scores.get(t, math.nan) for t in present}
            complete = all(t in scores for t in present)
            row["Avg"] = float(np.mean([scores[t] for t in present])) if complete else math.nan
            row["KV kept"] = float(point["kv_kept_fraction"].mean())
            rows["All KV" if point["policy"].iloc[0] == "full" and name == "full" else name] = row
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "setting"
        out[f"table_snapkv_longbench__{safe(model)}"] = table
    return out
