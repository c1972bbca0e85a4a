"""Read results rows back: one DataFrame for every ``results.jsonl`` under a directory, summaries with CIs.

A row is one (model, policy, budget, task, seed, ...) run, keyed by ``config_hash``; a rerun that wrote a row
again (a copied results dir, a second store) is de-duplicated to the latest timestamp. Per-example scores come
from ``predictions/<config_hash>.jsonl`` beside the row's ``results.jsonl``.

``python -m kvbench.results RESULTS_DIR`` writes score and efficiency tables (markdown + CSV) under
``RESULTS_DIR/summary/``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvbench import schema
from kvbench.labels import display_name
from kvbench.store import ResultStore, failed, read_lines

MACRO = "average"  # task name of the macro-average rows that ``summary`` adds
N_RESAMPLES = 1000
SEED = 0

# Defaults for row keys an older or partial row may lack, so every column below exists.
ROW_DEFAULTS: dict[str, Any] = schema.ROW_DEFAULTS
NUMERIC = schema.NUMERIC
# One point of a curve: a model, a policy configuration (+ protocol variant) and a budget.
POINT = ["model", "setting", "budget_kind", "budget_x"]
EFFICIENCY = {column: "mean" for column in schema.EFFICIENCY}


def _format_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}={_format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def policy_label(policy: str, params: dict[str, Any] | None, display: str | None = None) -> str:
    """``snapkv(window=32,kernel=7)``: the policy's display name (default: its name) and its parameters in
    field order; a marked display name is set apart, ``corm (capped, kvbench) (w=256,r=256)``."""
    name = display or policy
    if not params:
        return name
    values = ",".join(f"{k}={_format_value(v)}" for k, v in params.items())
    return f"{name} ({values})" if name != policy else f"{name}({values})"


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
        policy_label(p, q, d) for p, q, d in zip(df["policy"], df["policy_params"], df["display_name"], strict=True)
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


def point_label(setting: str, budget_label: str) -> str:
    """Column name of one point in wide tables: ``snapkv(window=32) @ 0.3``."""
    return setting if budget_label == "-" else f"{setting} @ {budget_label}"


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvbench.results", description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", nargs="?", default="results")
    parser.add_argument("--out", default=None, help="output folder (default: RESULTS_DIR/summary)")
    args = parser.parse_args(argv)
    if not Path(args.results_dir).exists():
        print(f"kvbench.results: error: results dir {args.results_dir} does not exist", file=sys.stderr)
        return 2
    written = write_summaries(args.results_dir, args.out)
    if not written:
        print("no results yet")
        return 0
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
