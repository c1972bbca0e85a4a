"""Paper figures and tables, one module per paper (each knows its own policy and data), and their registry.

``PAPER`` maps each ``scripts/<name>.py`` to its builder (rows -> ``{file stem: Figure | DataFrame}``) and the
words of its "no results yet" line.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from kvbench.analysis.figures import Output
from kvbench.analysis.papers.corm import corm_compression_vs_length, corm_longbench_table
from kvbench.analysis.papers.fastgen import fastgen_tradeoff
from kvbench.analysis.papers.less import less_gap_recovered
from kvbench.analysis.papers.needle import needle_heatmaps, scores_by_length
from kvbench.analysis.papers.snapkv import snapkv_longbench_table

Builder = Callable[[pd.DataFrame, pd.DataFrame | None], Output]

PAPER: dict[str, tuple[Builder, str]] = {
    "fig_corm_compression_vs_length": (corm_compression_vs_length, "CORM compression vs sequence length"),
    "table_corm_longbench": (corm_longbench_table, "the CORM LongBench table"),
    "fig_fastgen_tradeoff": (fastgen_tradeoff, "the FastGen pruned-KV vs score trade-off"),
    "fig_less_gap_recovered": (less_gap_recovered, "the LESS share of the H2O gap recovered"),
    "table_snapkv_longbench": (snapkv_longbench_table, "the SnapKV LongBench table"),
    "table_scores_by_length": (scores_by_length, "passkey and needle by context length"),
    "fig_needle_heatmap": (needle_heatmaps, "the needle-in-a-haystack heatmaps (depth x length)"),
}
