"""Tables from summary lines: GitHub markdown, the per-policy caveats under them, and a results dir's
``summary/{scores,efficiency}.{md,csv}``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from kvbench.analysis.load import efficiency, load, summary
from kvbench.analysis.names import point_label

# Caveats printed under any markdown table that has rows of the policy.
NOTES = {
    "fastgen": (
        "fastgen: its punctuation set is always kept, and about 20% of the synthetic prompts' tokens (the passkey "
        "filler) are punctuation, so its kept fraction floors near 0.56 for every T there; that compression is "
        "not comparable with the paper's (AlpacaEval prompts)."
    ),
}


def notes(table: pd.DataFrame) -> str:
    """The ``NOTES`` of the policies whose names appear in a table's index or columns, as markdown lines."""
    names = " ".join(str(v) for v in [*table.index, *table.columns, *table.get("setting", [])])
    found = [note for policy, note in NOTES.items() if policy in names]
    return "".join(f"\nNote — {note}\n" for note in found)


def markdown(table: pd.DataFrame, floatfmt: str = "{:.2f}") -> str:
    """A DataFrame as a GitHub markdown table (index included when it is named)."""
    if table.index.name is not None or isinstance(table.index, pd.MultiIndex):
        table = table.reset_index()

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, float):
            return floatfmt.format(value)
        return str(value).replace("|", "\\|")

    header = [str(c) for c in table.columns]
    body = [[cell(v) for v in values] for values in table.itertuples(index=False)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def score_table(lines: pd.DataFrame) -> pd.DataFrame:
    """Wide score table of one model: a row per task (average last), a column per point, ``score [lo, hi]``."""

    def cell(line: pd.Series) -> str:
        if math.isnan(line["ci_low"]):
            return f"{line['score']:.2f}"
        return f"{line['score']:.2f} [{line['ci_low']:.2f}, {line['ci_high']:.2f}]"

    lines = lines.assign(
        point=[point_label(s, b) for s, b in zip(lines["setting"], lines["budget_label"], strict=True)]
    )
    lines = lines.assign(cell=lines.apply(cell, axis=1))
    order = list(dict.fromkeys(lines["point"]))
    tasks = list(dict.fromkeys(lines["task"]))
    table = lines.pivot(index="task", columns="point", values="cell").reindex(index=tasks, columns=order)
    table.columns.name = None
    return table.fillna("-")


def write_summaries(results_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write ``scores.{md,csv}`` and ``efficiency.{md,csv}`` (default: ``<results_dir>/summary``)."""
    df = load(results_dir)
    if df.empty:
        return []
    out = Path(out_dir) if out_dir is not None else Path(results_dir) / "summary"
    out.mkdir(parents=True, exist_ok=True)
    lines = summary(df)
    eff = efficiency(df)
    scores_md, eff_md = ["# Scores (100 x mean, 95% bootstrap CI)\n"], ["# Efficiency (mean over tasks)\n"]
    for model, per_model in lines.groupby("model", sort=True):
        table = score_table(per_model)
        scores_md += [f"\n## {model}\n\n", markdown(table), notes(table)]
    for model, per_model in eff.groupby("model", sort=True):
        table = pd.DataFrame(
            {
                "setting": per_model["setting"],
                "budget": per_model["budget_label"],
                "masked": per_model["kv_masked"].map({True: "yes", False: ""}),
                "kv kept": per_model["kv_kept_fraction"],
                "KV MiB in decode": per_model["kv_bytes_decode"] / 2**20,
                "KV MiB run peak": per_model["kv_bytes"] / 2**20,
                "peak MiB": per_model["peak_memory_bytes"] / 2**20,
                "prefill peak MiB": per_model["peak_memory_prefill_bytes"] / 2**20,
                "decode peak MiB": per_model["peak_memory_decode_bytes"] / 2**20,
                "decode tok/s": per_model["decode_tokens_per_s"],
                "prefill tok/s": per_model["prefill_tokens_per_s"],
                "TTFT s": per_model["ttft_s"],
            }
        )
        eff_md += [f"\n## {model}\n\n", markdown(table, "{:.3f}")]
    written = [out / name for name in ("scores.md", "scores.csv", "efficiency.md", "efficiency.csv")]
    written[0].write_text("".join(scores_md))
    lines.drop(columns="policy_params").to_csv(written[1], index=False)
    written[2].write_text("".join(eff_md))
    eff.drop(columns="policy_params").to_csv(written[3], index=False)
    return written
