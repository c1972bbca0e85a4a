"""Figures and paper tables, drawn from results rows and predictions only (never a model).

``python -m kvbench.plots RESULTS_DIR [--out DIR]`` regenerates every figure (PNG + PDF) and paper table
(markdown + CSV) under ``RESULTS_DIR/figures``. Each builder takes the rows of ``kvbench.results.load`` and
returns ``{file stem: Figure | DataFrame}`` (empty when its inputs are absent); ``scripts/fig_*.py`` and
``scripts/table_*.py`` are thin wrappers over one builder each. Figures are ``matplotlib.figure.Figure`` objects
made without pyplot, so they render with Agg and leave any interactive backend alone.

Conventions: the full cache is a black dashed line with its CI band; budgeted policies are curves over their
budget (fraction kept, or tokens per head); policies without a budget (CORM, FastGen) sit at the KV fraction
they achieved; masked policies (memory not freed) are labelled "(masked)" and drawn with hollow markers.
"""

from __future__ import annotations

import argparse
import math
import re
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kvbench import results
from kvbench.metrics.longbench import CATEGORIES, category_means, macro_average

Output = dict[str, Figure | pd.DataFrame]

# LongBench v1's Chinese tasks (the rest, code included, make up the English tables of the LongBench README).
ZH_TASKS = frozenset({"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"})
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
# LESS's ``base`` parameter -> the kvbench policy that holds the same sparse set.
LESS_BASES = {"lambda": "streaming_llm"}
# FastGen's recovery ratio T, under either name a policy may give it.
FASTGEN_T = ("recovery", "T")
MIB = 2**20
# How peak memory was measured (the row's ``peak_memory_kind``), in words.
PEAK_KINDS = {
    "cpu_rss_high_water_per_phase": "process RSS high-water mark per phase",
    "cpu_max_rss_lifetime": "process max RSS over the run",
    "cuda_max_allocated": "CUDA max allocated",
}
FORMATS = ("png", "pdf")


def safe(name: str) -> str:
    """A file-name-safe version of a label: ``snapkv(window=32)`` -> ``snapkv_window_32``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", str(name)).strip("_")


def save(outputs: Output, out_dir: str | Path, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    """Write figures (PNG and PDF by default) and tables (markdown and CSV); returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, item in outputs.items():
        if isinstance(item, Figure):
            for suffix in formats:
                stamp = {"CreationDate": None} if suffix == "pdf" else None  # byte-identical on regeneration
                item.savefig(out / f"{stem}.{suffix}", dpi=150, bbox_inches="tight", metadata=stamp)
                written.append(out / f"{stem}.{suffix}")
        else:
            (out / f"{stem}.md").write_text(results.markdown(item) + results.notes(item))
            item.to_csv(out / f"{stem}.csv")
            written += [out / f"{stem}.md", out / f"{stem}.csv"]
    return written


# --- drawing helpers --------------------------------------------------------------------------------------


def _grid(n: int, width: float = 4.0, height: float = 3.2) -> tuple[Figure, list[Axes]]:
    ncols = min(4, max(1, n))
    nrows = math.ceil(max(1, n) / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _colors(labels: list[str]) -> dict[str, Any]:
    """A stable color per series label (sorted), from tab10 (tab20 beyond ten series)."""
    import matplotlib

    names = sorted(set(labels))
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _legend(fig: Figure, axes: list[Axes]) -> None:
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        ncols = max(1, min(3, len(handles), int(fig.get_figwidth() // 3.5)))  # labels are long: ~3.5 in each
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=ncols, fontsize=8)


# One colour per policy in every figure; a policy not listed is grey.
POLICY_COLORS = {
    "streaming_llm": "tab:blue",
    "h2o": "tab:orange",
    "snapkv": "tab:green",
    "pyramidkv": "tab:red",
    "tova": "tab:purple",
    "scissorhands": "tab:brown",
    "knorm": "tab:pink",
    "random": "tab:olive",
    "corm": "tab:cyan",
    "fastgen": "darkgoldenrod",
    "less": "navy",
    "fixed_capacity": "darkslategray",
}


def policy_color(policy: str) -> str:
    """The colour of a policy (by its config name), the same in every figure."""
    return POLICY_COLORS.get(policy, "tab:gray")


def _value_text(value: Any) -> str:
    """A parameter value for a legend: a path shows only its last part (never a local folder)."""
    if isinstance(value, str) and ("/" in value or "\\" in value):
        return Path(value).name
    return results._format_value(value)


def short_labels(lines: pd.DataFrame) -> dict[str, str]:
    """Legend label per setting of one figure: the policy's display name, plus only the parameters (and
    protocol variant) that differ between that policy's settings in the figure; paths reduced to their name."""
    out: dict[str, str] = {}
    firsts = lines.drop_duplicates("setting")
    for _, group in firsts.groupby("display_name", sort=False):
        params = [p if isinstance(p, dict) else {} for p in group["policy_params"]]
        keys = list(dict.fromkeys(k for p in params for k in p))
        varying = [k for k in keys if len({_value_text(p.get(k)) for p in params}) > 1]
        variants = set(group["variant"])
        for (_, line), p in zip(group.iterrows(), params, strict=True):
            parts = [f"{k}={_value_text(p.get(k))}" for k in varying]
            if len(variants) > 1 and line["variant"]:
                parts.append(line["variant"])
            name = "full cache" if line["policy"] == "full" else line["display_name"]
            out[line["setting"]] = f"{name} ({', '.join(parts)})" if parts else name
    return out


def _series(lines: pd.DataFrame, kind: str, labels: dict[str, str]) -> list[tuple[str, pd.DataFrame, bool]]:
    """The curves of one panel: (label, points sorted by x in column ``_x``, is_reference).

    Budgeted settings of ``kind`` are curves over the budget; on a fraction axis, each policy without a budget
    is one curve over the kept fraction it achieved (its parameter sweep); the full cache is a reference.
    ``labels`` maps each setting to its legend label (``short_labels`` of the whole figure).
    """
    out = []
    for setting, points in lines[lines["policy"] == "full"].groupby("setting", sort=True):
        out.append((labels[setting], points.assign(_x=np.nan), True))
    budgeted = lines[(lines["policy"] != "full") & (lines["budget_kind"] == kind)]
    for setting, points in budgeted.groupby("setting", sort=True):
        label = labels[setting] + (" (masked)" if points["kv_masked"].any() else "")
        out.append((label, points.assign(_x=points["budget_x"]).sort_values("_x"), False))
    if kind == "fraction":
        adaptive = lines[(lines["policy"] != "full") & (lines["budget_kind"] == "none")]
        for (name, variant), points in adaptive.groupby(["display_name", "variant"], sort=True):
            label = f"{name}{f' [{variant}]' if variant else ''} (achieved)"
            label += " (masked)" if points["kv_masked"].any() else ""
            out.append((label, points.assign(_x=points["kv_kept_fraction"]).sort_values("_x"), False))
    return out


MARKERS = "osD^vP*X"


def _draw(
    ax: Axes, lines: pd.DataFrame, kind: str, labels: dict[str, str], value: Callable[[pd.DataFrame], Any]
) -> None:
    """Draw every series of ``lines`` on ``ax``; ``value(points)`` gives y; CI bands where ``ci_low`` exists.
    A policy keeps its colour (``policy_color``); its settings differ by marker; extensions and approximations
    are dashed, adaptive policies (no budget, at their achieved fraction) dotted."""
    band = "ci_low" in lines.columns and value is _score
    seen: dict[str, int] = {}
    for label, points, reference in _series(lines, kind, labels):
        y = np.asarray(value(points), dtype=float)
        if np.all(np.isnan(y)):
            continue
        if reference:
            color = "black"
            ax.axhline(np.nanmean(y), color=color, linestyle="--", linewidth=1.2, label=label)
            if band and points["ci_low"].notna().any():
                ax.axhspan(points["ci_low"].mean(), points["ci_high"].mean(), color=color, alpha=0.08)
            continue
        first = points.iloc[0]
        policy = first["policy"]
        color = policy_color(policy)
        marker = MARKERS[seen.get(policy, 0) % len(MARKERS)]
        seen[policy] = seen.get(policy, 0) + 1
        achieved = "(achieved)" in label
        extension = first["display_name"] != policy
        ax.plot(
            points["_x"],
            y,
            marker=marker,
            markersize=4,
            color=color,
            markerfacecolor="none" if points["kv_masked"].any() else color,
            linestyle=":" if achieved else "--" if extension else "-",
            linewidth=1.2,
            label=label,
        )
        if band and points["ci_low"].notna().any():
            ax.fill_between(points["_x"], points["ci_low"], points["ci_high"], color=color, alpha=0.08, linewidth=0)


def _score(points: pd.DataFrame) -> pd.Series:
    return points["score"]


def _kinds(lines: pd.DataFrame) -> list[str]:
    """Budget axes a model needs: fraction and/or tokens (policies without a budget go on the fraction axis)."""
    kinds = set(lines.loc[lines["policy"] != "full", "budget_kind"])
    if "none" in kinds:
        kinds = (kinds - {"none"}) | {"fraction"}
    return sorted(kinds) or ["fraction"]


def _axis(ax: Axes, lines: pd.DataFrame, kind: str) -> None:
    if kind == "tokens":
        ax.set_xlabel("KV budget (tokens per head)")
        xs = lines.loc[lines["budget_kind"] == "tokens", "budget_x"].dropna()
        if len(xs) and xs.max() / max(xs.min(), 1) >= 4:
            ax.set_xscale("log", base=2)
    else:
        ax.set_xlabel("KV budget (fraction kept)")
        ax.set_xlim(0, 1.02)
    ax.grid(alpha=0.3)


def _suffix(kind: str) -> str:
    return "" if kind == "fraction" else f"_{kind}"


def _task_title(task: str) -> str:
    return "macro average" if task == results.MACRO else task


# --- figures ----------------------------------------------------------------------------------------------


def score_vs_budget(df: pd.DataFrame, lines: pd.DataFrame | None = None) -> Output:
    """Score (95% CI band) vs budget per policy: one panel per task plus the macro average, per model; and
    the macro average alone (``score_vs_budget_average__<model>``), the main figure."""
    lines = results.summary(df) if lines is None else lines
    out: Output = {}
    for model, per_model in lines.groupby("model", sort=True):
        labels = short_labels(per_model)
        tasks = [t for t in dict.fromkeys(per_model["task"]) if t != results.MACRO]
        panels = tasks + ([results.MACRO] if (per_model["task"] == results.MACRO).any() else [])
        for kind in _kinds(per_model):
            fig, axes = _grid(len(panels))
            for ax, task in zip(axes, panels, strict=True):
                _draw(ax, per_model[per_model["task"] == task], kind, labels, _score)
                _axis(ax, per_model, kind)
                ax.set_title(_task_title(task), fontsize=10)
                ax.set_ylabel("score")
            fig.suptitle(f"{model}: score vs KV budget")
            _legend(fig, axes)
            out[f"score_vs_budget{_suffix(kind)}__{safe(model)}"] = fig
            kinds = [kind, "none"] if kind == "fraction" else [kind]
            macro = per_model[(per_model["task"] == results.MACRO) & (per_model["policy"] != "full")]
            macro = macro[macro["budget_kind"].isin(kinds)]
            if results.MACRO in panels and macro.empty:
                print(f"score_vs_budget_average{_suffix(kind)}__{safe(model)}: not drawn, no policy has every task")
            elif results.MACRO in panels:
                fig = Figure(figsize=(7, 5.5), layout="constrained")
                ax = fig.subplots()
                _draw(ax, per_model[per_model["task"] == results.MACRO], kind, labels, _score)
                _axis(ax, per_model, kind)
                ax.set_ylabel(f"score, macro average over {len(tasks)} tasks")
                ax.set_title(f"{model}: score vs KV budget (95% bootstrap CI)")
                _legend(fig, [ax])
                out[f"score_vs_budget_average{_suffix(kind)}__{safe(model)}"] = fig
    return out


def _efficiency_figure(
    df: pd.DataFrame, name: str, title: str, panels: list[tuple[str, Callable[[pd.DataFrame], Any]]]
) -> Output:
    """One figure per model and budget axis, a panel per (y label, value) of ``results.efficiency``."""
    eff = results.efficiency(df)
    out: Output = {}
    for model, per_model in eff.groupby("model", sort=True):
        kept = [(label, value) for label, value in panels if per_model.pipe(value).notna().any()]
        if not kept:
            continue
        labels = short_labels(per_model)
        for kind in _kinds(per_model):
            fig, axes = _grid(len(kept))
            for ax, (label, value) in zip(axes, kept, strict=True):
                _draw(ax, per_model, kind, labels, value)
                _axis(ax, per_model, kind)
                ax.set_ylabel(label)
            fig.suptitle(f"{model}: {title}, mean over tasks")
            _legend(fig, axes)
            out[f"{name}{_suffix(kind)}__{safe(model)}"] = fig
    return out


def memory_vs_budget(df: pd.DataFrame, lines: pd.DataFrame | None = None) -> Output:
    """KV cache bytes held while decoding and at the run's peak (policy state included; in whole-prompt mode
    the peak comes before the prompt is compressed), and peak memory, overall and per phase."""
    kinds = df["peak_memory_kind"].dropna().unique() if "peak_memory_kind" in df else []
    kind = f" (peak memory: {PEAK_KINDS.get(kinds[0], kinds[0])})" if len(kinds) == 1 else ""
    panels = [
        ("KV cache held in decode (MiB)", lambda p: p["kv_bytes_decode"] / MIB),
        ("KV cache, run peak (MiB)", lambda p: p["kv_bytes"] / MIB),
        ("peak memory (MiB)", lambda p: p["peak_memory_bytes"] / MIB),
        ("peak memory in prefill (MiB)", lambda p: p["peak_memory_prefill_bytes"] / MIB),
        ("peak memory in decode (MiB)", lambda p: p["peak_memory_decode_bytes"] / MIB),
    ]
    return _efficiency_figure(df, "memory_vs_budget", f"memory vs KV budget{kind}", panels)


def throughput_vs_budget(df: pd.DataFrame, lines: pd.DataFrame | None = None) -> Output:
    """Decode and prefill throughput and time to first token vs budget."""
    panels = [
        ("decode tokens/s", lambda p: p["decode_tokens_per_s"]),
        ("prefill tokens/s", lambda p: p["prefill_tokens_per_s"]),
        ("time to first token (s)", lambda p: p["ttft_s"]),
    ]
    return _efficiency_figure(df, "throughput_vs_budget", "speed vs KV budget", panels)


def attention_mass_vs_budget(df: pd.DataFrame, lines: pd.DataFrame | None = None) -> Output:
    """Share of the full-cache attention mass the kept entries carry vs budget (rows where it was measured)."""
    panels = [("attention mass retained", lambda p: p["attention_mass_retained"])]
    return _efficiency_figure(df, "attention_mass_vs_budget", "attention mass retained vs KV budget", panels)


def _head_fractions(rows: pd.DataFrame) -> tuple[np.ndarray | None, bool]:
    """Mean [layers, kv_heads] kept fraction over every example of ``rows``, and whether heads differ."""
    arrays = [
        np.asarray(record["kv_kept_per_head"], dtype=float)
        for _, row in rows.iterrows()
        for record in results.predictions(row)
        if record.get("kv_kept_per_head")
    ]
    shapes = {a.shape for a in arrays}
    if not arrays or len(shapes) != 1 or len(next(iter(shapes))) != 2:
        return None, False
    stack = np.stack(arrays)  # [N, L, Hkv]
    ragged = bool(np.any(np.ptp(stack, axis=2) > 1e-6))
    return stack.mean(axis=0), ragged


def kept_heatmaps(df: pd.DataFrame, lines: pd.DataFrame | None = None) -> Output:
    """Per-layer x per-KV-head kept fraction for ragged policies (heads keep different amounts), one panel per
    budget, averaged over every example of every task."""
    out: Output = {}
    for (model, setting), rows in df[df["policy"] != "full"].groupby(["model", "setting"], sort=True):
        maps = []
        for (_, _, label), point in rows.groupby(["budget_kind", "budget_x", "budget_label"], dropna=False, sort=True):
            mean, ragged = _head_fractions(point)
            if mean is not None and ragged:
                maps.append((label, mean, point["kv_kept_fraction"].mean()))
        if not maps:
            continue
        fig, axes = _grid(len(maps), width=3.2, height=3.6)
        image = None
        for ax, (label, mean, kept) in zip(axes, maps, strict=True):
            image = ax.imshow(mean, vmin=0, vmax=1, aspect="auto", cmap="viridis", interpolation="nearest")
            budget = "no budget" if label == "-" else f"budget {label}"
            ax.set_title(f"{budget}: kept {kept:.2f}", fontsize=9)
            ax.set_xlabel("KV head")
            ax.set_ylabel("layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(image, ax=axes, label="kept fraction", shrink=0.8)
        fig.suptitle(f"{model}: {setting}, kept fraction per layer and KV head")
        out[f"kept_heads__{safe(model)}__{safe(setting)}"] = fig
    return out


def main_figures(df: pd.DataFrame, lines: pd.DataFrame | None = None) -> Output:
    """Every general (non-paper) figure."""
    lines = results.summary(df) if lines is None else lines
    out: Output = {}
    for builder in (score_vs_budget, memory_vs_budget, throughput_vs_budget, attention_mass_vs_budget):
        out.update(builder(df, lines))
    out.update(kept_heatmaps(df))
    return out


# --- paper figures and tables -----------------------------------------------------------------------------


def corm_compression_vs_length(df: pd.DataFrame, lines: pd.DataFrame | None = None) -> Output:
    """CORM (Fig. 4 of 2404.15949): the KV fraction CORM keeps vs prompt length, per example, with binned means;
    CORM has no budget, so its compression is an outcome that grows with the sequence."""
    out: Output = {}
    for model, rows in df[df["policy"] == "corm"].groupby("model", sort=True):
        colors = _colors(list(rows["setting"]))
        fig = Figure(figsize=(7, 5), layout="constrained")
        ax = fig.subplots()
        drawn = False
        for setting, point in rows.groupby("setting", sort=True):
            records = [r for _, row in point.iterrows() for r in results.predictions(row)]
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


def _longbench_subset(task: str) -> str | None:
    """``qasper`` for a LongBench v1 task name ``longbench/qasper``; None for any other task."""
    family, _, subset = task.partition("/")
    return subset if family == "longbench" and subset in CATEGORIES else None


def _points(lines: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The (setting, budget) points of one model's summary lines, full cache first, as (column name, lines)."""
    keys = ["setting", "budget_kind", "budget_x"]
    points = []
    for (setting, _, _), point in lines.groupby(keys, dropna=False, sort=True):
        name = results.point_label(setting, point["budget_label"].iloc[0])
        points.append((point["policy"].iloc[0] != "full", name, point))
    return [(name, point) for _, name, point in sorted(points, key=lambda p: p[0])]


def corm_longbench_table(df: pd.DataFrame, lines: pd.DataFrame | None = None) -> Output:
    """CORM's LongBench layout (Tables 1-2 of 2404.15949): per task, per category, overall (EN, ZH, all),
    one column per (policy, budget); overall = mean of the category means, as the LongBench README averages."""
    lines = results.summary(df) if lines is None else lines
    out: Output = {}
    for model, per_model in lines.groupby("model", sort=True):
        per_model = per_model[per_model["task"].map(_longbench_subset).notna()]
        if per_model.empty:
            continue
        present = set(per_model["task"].map(_longbench_subset))
        categories = list(dict.fromkeys(CATEGORIES[t] for t in CATEGORIES if t in present))
        columns = {}
        for name, point in _points(per_model):
            scores = {_longbench_subset(t): s for t, s in zip(point["task"], point["score"], strict=True)}
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


def snapkv_longbench_table(df: pd.DataFrame, lines: pd.DataFrame | None = None) -> Output:
    """SnapKV's LongBench table (README of FasterDecoding/SnapKV): a row per setting ("All KV", then each
    policy at each fixed budget), its 16 English/code tasks as columns, their mean and the KV fraction kept."""
    lines = results.summary(df) if lines is None else lines
    out: Output = {}
    for model, per_model in lines.groupby("model", sort=True):
        per_model = per_model[per_model["task"].map(_longbench_subset).isin(list(SNAPKV_COLUMNS))]
        if per_model.empty:
            continue
        present = [t for t in SNAPKV_COLUMNS if t in set(per_model["task"].map(_longbench_subset))]
        rows = {}
        for name, point in _points(per_model):
            scores = {_longbench_subset(t): s for t, s in zip(point["task"], point["score"], strict=True)}
            row = {SNAPKV_COLUMNS[t]: scores.get(t, math.nan) for t in present}
            complete = all(t in scores for t in present)
            row["Avg"] = float(np.mean([scores[t] for t in present])) if complete else math.nan
            row["KV kept"] = float(point["kv_kept_fraction"].mean())
            rows["All KV" if point["policy"].iloc[0] == "full" and name == "full" else name] = row
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "setting"
        out[f"table_snapkv_longbench__{safe(model)}"] = table
    return out


def _fastgen_t(params: Any) -> float | None:
    params = params if isinstance(params, dict) else {}
    return next((float(params[k]) for k in FASTGEN_T if params.get(k) is not None), None)


def fastgen_tradeoff(df: pd.DataFrame, lines: pd.DataFrame | None = None) -> Output:
    """FastGen (Table 1 / Fig. 5 of 2310.01801): score vs the KV fraction kept (achieved) across FastGen's
    recovery ratios T, against the fixed-budget (non-adaptive) policies over their budgets; a panel per task
    (where FastGen has two T at least) + average."""
    lines = results.summary(df) if lines is None else lines
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
                results.policy_label("fastgen", {k: v for k, v in (p or {}).items() if k not in FASTGEN_T})
                + (f" [{v}]" if v else "")
                for p, v in zip(fastgen["policy_params"], fastgen["variant"], strict=True)
            ],
        )
        series += [(name, points, True) for name, points in base.groupby("_series", sort=True)]
        labels = short_labels(per_model)
        series += [(labels[name], points, False) for name, points in others.groupby("setting", sort=True)]
        tasks = [t for t in dict.fromkeys(per_model["task"]) if t != results.MACRO]
        panels = tasks + ([results.MACRO] if (per_model["task"] == results.MACRO).any() else [])
        panels = [t for t in panels if (fastgen["task"] == t).sum() >= 2]  # a trade-off needs two T at least
        if not panels:
            print(f"fig_fastgen_tradeoff__{safe(model)}: not drawn, no task has FastGen at two T")
            continue
        fig, axes = _grid(len(panels), width=4.5, height=3.6)
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
            ax.set_title(_task_title(task), fontsize=10)
        fig.suptitle(f"{model}: FastGen's adaptive compression vs fixed-budget policies")
        _legend(fig, axes)
        out[f"fig_fastgen_tradeoff__{safe(model)}"] = fig
    return out


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
        for record in results.predictions(row)
        if record.get("score") is not None
    }


def _paired(df: pd.DataFrame, *lines: pd.Series) -> list[float] | None:
    """100 x the mean score of each line over the examples they all have (None when they share none)."""
    scores = [_example_scores(df, line) for line in lines]
    shared = set.intersection(*(set(s) for s in scores))
    return [100 * float(np.mean([s[i] for i in shared])) for s in scores] if shared else None


def less_gap_table(lines: pd.DataFrame, df: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per model, task (and average) and budget: full, base and LESS scores, LESS - base, and the share of the gap
    that LESS recovers, ``(less - base) / (full - base)`` in percent (NaN when the base is not below the full
    cache: there is no gap to recover).

    With the rows ``df``, the three scores of a task are means over the examples all three were run on (a LESS
    setting run at fewer lengths is compared on those lengths only), and the average is the mean of the
    per-task values; without it, the summary lines' scores are used as they are."""
    rows = []
    for _, less in lines[lines["policy"] == "less"].iterrows():
        if df is not None and less["task"] == results.MACRO:
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
            per_model = lines[(lines["model"] == model) & (lines["task"] != results.MACRO)]
            if len(group) > 1 and set(group["task"]) == set(per_model["task"]):
                means = group[["full", "base_score", "less_score"]].mean()
                macro.append({"model": model, "task": results.MACRO, "less": setting, "budget": budget, "base": base})
                macro[-1].update(means.to_dict())
        table = pd.concat([table, pd.DataFrame(macro, columns=table.columns)], ignore_index=True)
    gap = table["full"] - table["base_score"]
    table["less_minus_base"] = table["less_score"] - table["base_score"]
    table["gap_recovered_pct"] = (100 * table["less_minus_base"] / gap).where(gap > 1e-9)
    return table


def less_gap_recovered(df: pd.DataFrame, lines: pd.DataFrame | None = None) -> Output:
    """LESS (2402.09398, e.g. "recovers 41.4% of the ROUGE-1 drop" of H2O): the share of the full - H2O gap that
    LESS closes at the same budget, per task and on the macro average; bars per (LESS setting, budget)."""
    lines = results.summary(df) if lines is None else lines
    table = less_gap_table(lines, df)
    out: Output = {}
    for model, per_model in table.groupby("model", sort=True):
        tasks = list(dict.fromkeys(t for t in per_model["task"] if t != results.MACRO))
        tasks += [results.MACRO] if (per_model["task"] == results.MACRO).any() else []
        bars = list(dict.fromkeys(zip(per_model["less"], per_model["budget"], strict=True)))
        colors = _colors([f"{s} @ {b}" for s, b in bars])
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
        ax.set_xticks(range(len(tasks)), [_task_title(t).removeprefix("longbench/") for t in tasks], rotation=30)
        ax.set_ylabel("gap to the full cache recovered by LESS (%)")
        ax.set_title(f"{model}: (LESS - base) / (full - base), base = {', '.join(sorted(set(per_model['base'])))}")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        out[f"fig_less_gap_recovered__{safe(model)}"] = fig
        out[f"table_less_gap_recovered__{safe(model)}"] = per_model.drop(columns="model").set_index("task")
    return out


def scores_by_length(df: pd.DataFrame, lines: pd.DataFrame | None = None) -> Output:
    """Synthetic retrieval (passkey, needle) by context length: a row per (policy, budget), a column per
    (task, length), each cell ``score (kept fraction)`` over that length's examples, per model."""
    records = []
    for _, row in df[df["task_family"] == "synthetic"].iterrows():
        point = results.point_label(row["setting"], row["budget_label"])
        for record in results.predictions(row):
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
            point = results.point_label(labels[row["setting"]], row["budget_label"])
            for record in results.predictions(row):
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


PAPER = {
    "fig_corm_compression_vs_length": (corm_compression_vs_length, "CORM compression vs sequence length"),
    "table_corm_longbench": (corm_longbench_table, "the CORM LongBench table"),
    "fig_fastgen_tradeoff": (fastgen_tradeoff, "the FastGen pruned-KV vs score trade-off"),
    "fig_less_gap_recovered": (less_gap_recovered, "the LESS share of the H2O gap recovered"),
    "table_snapkv_longbench": (snapkv_longbench_table, "the SnapKV LongBench table"),
    "table_scores_by_length": (scores_by_length, "passkey and needle by context length"),
    "fig_needle_heatmap": (needle_heatmaps, "the needle-in-a-haystack heatmaps (depth x length)"),
}


def all_outputs(df: pd.DataFrame) -> Output:
    """Every figure and paper table the rows allow (the summary with its bootstrap is computed once)."""
    if df.empty:
        return {}
    lines = results.summary(df)
    out = main_figures(df, lines)
    for builder, _ in PAPER.values():
        out.update(builder(df, lines))
    return out


def _parse(argv: list[str] | None, prog: str, description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("results_dir", nargs="?", default="results", help="searched recursively for results.jsonl")
    parser.add_argument("--out", default=None, help="output folder (default: RESULTS_DIR/figures)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="figure formats (default: png,pdf)")
    return parser.parse_args(argv)


def _report(outputs: Output, args: argparse.Namespace) -> None:
    formats = tuple(f.strip().lstrip(".") for f in args.formats.split(",") if f.strip())
    written = save(outputs, args.out or Path(args.results_dir) / "figures", formats)
    for stem, item in outputs.items():
        if isinstance(item, pd.DataFrame):
            print(f"\n{stem}\n\n{results.markdown(item)}")
    print(f"wrote {len(written)} files to {written[0].parent}")


def script(name: str, argv: list[str] | None = None) -> int:
    """Entry of ``scripts/<name>.py``: build one paper figure or table from a results dir."""
    import matplotlib

    matplotlib.use("Agg")
    builder, what = PAPER[name]
    args = _parse(argv, f"scripts/{name}.py", builder.__doc__.splitlines()[0])
    df = results.load(args.results_dir)
    outputs = builder(df) if not df.empty else {}
    if not outputs:
        print(f"no results for {what} yet (in {args.results_dir})")
        return 0
    _report(outputs, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m kvbench.plots RESULTS_DIR``: every figure and paper table, regenerated from the rows."""
    import matplotlib

    matplotlib.use("Agg")
    args = _parse(argv, "python -m kvbench.plots", __doc__.splitlines()[0])
    df = results.load(args.results_dir)
    if df.empty:
        print("no results yet")
        return 0
    _report(all_outputs(df), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
