"""General figures, drawn from results rows and summary lines only (never a model), and ``save``.

Each builder takes the rows of ``kvbench.analysis.load.load`` (and optionally their ``summary``) and returns
``{file stem: Figure | DataFrame}`` (empty when its inputs are absent). Figures are ``matplotlib.figure.Figure``
objects made without pyplot, so they render with Agg and leave any interactive backend alone. Nothing here knows
a policy by name: what differs between policies comes from the rows (budget kind, display name, masking).

Conventions: the full cache is a black dashed line with its CI band; budgeted policies are curves over their
budget (fraction kept, or tokens per head); policies without a budget sit at the KV fraction they achieved;
extensions and approximations (a marked display name) are dashed; masked policies (memory not freed) are
labelled "(masked)" and drawn with hollow markers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kvbench.analysis.load import MACRO, efficiency, predictions, summary
from kvbench.analysis.names import FORMATS, safe, value_text
from kvbench.analysis.tables import markdown, notes

Output = dict[str, Figure | pd.DataFrame]

MIB = 2**20
# How peak memory was measured (the row's ``peak_memory_kind``), in words.
PEAK_KINDS = {
    "cpu_rss_high_water_per_phase": "process RSS high-water mark per phase",
    "cpu_max_rss_lifetime": "process max RSS over the run",
    "cuda_max_allocated": "CUDA max allocated",
}


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
            (out / f"{stem}.md").write_text(markdown(item) + notes(item))
            item.to_csv(out / f"{stem}.csv")
            written += [out / f"{stem}.md", out / f"{stem}.csv"]
    return written


# --- drawing helpers --------------------------------------------------------------------------------------


def panel_grid(n: int, width: float = 4.0, height: float = 3.2) -> tuple[Figure, list[Axes]]:
    """A figure of ``n`` panels, four to a row, each ``width`` x ``height`` inches; the spare ones hidden."""
    ncols = min(4, max(1, n))
    nrows = math.ceil(max(1, n) / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def series_colors(labels: list[str]) -> dict[str, Any]:
    """A stable color per series label (sorted), from tab10 (tab20 beyond ten series)."""
    import matplotlib

    names = sorted(set(labels))
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def figure_legend(fig: Figure, axes: list[Axes]) -> None:
    """One legend below the panels, each label once (the first handle drawn with it)."""
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


def short_labels(lines: pd.DataFrame) -> dict[str, str]:
    """Legend label per setting of one figure: the policy's display name, plus only the parameters (and
    protocol variant) that differ between that policy's settings in the figure; paths reduced to their name."""
    out: dict[str, str] = {}
    firsts = lines.drop_duplicates("setting")
    for _, group in firsts.groupby("display_name", sort=False):
        params = [p if isinstance(p, dict) else {} for p in group["policy_params"]]
        keys = list(dict.fromkeys(k for p in params for k in p))
        varying = [k for k in keys if len({value_text(p.get(k)) for p in params}) > 1]
        variants = set(group["variant"])
        for (_, line), p in zip(group.iterrows(), params, strict=True):
            parts = [f"{k}={value_text(p.get(k))}" for k in varying]
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


def task_title(task: str) -> str:
    """A panel title: the task's name, or "macro average"."""
    return "macro average" if task == MACRO else task


# --- figures ----------------------------------------------------------------------------------------------


def score_vs_budget(df: pd.DataFrame, lines: pd.DataFrame | None = None) -> Output:
    """Score (95% CI band) vs budget per policy: one panel per task plus the macro average, per model; and
    the macro average alone (``score_vs_budget_average__<model>``), the main figure."""
    lines = summary(df) if lines is None else lines
    out: Output = {}
    for model, per_model in lines.groupby("model", sort=True):
        labels = short_labels(per_model)
        tasks = [t for t in dict.fromkeys(per_model["task"]) if t != MACRO]
        panels = tasks + ([MACRO] if (per_model["task"] == MACRO).any() else [])
        for kind in _kinds(per_model):
            fig, axes = panel_grid(len(panels))
            for ax, task in zip(axes, panels, strict=True):
                _draw(ax, per_model[per_model["task"] == task], kind, labels, _score)
                _axis(ax, per_model, kind)
                ax.set_title(task_title(task), fontsize=10)
                ax.set_ylabel("score")
            fig.suptitle(f"{model}: score vs KV budget")
            figure_legend(fig, axes)
            out[f"score_vs_budget{_suffix(kind)}__{safe(model)}"] = fig
            kinds = [kind, "none"] if kind == "fraction" else [kind]
            macro = per_model[(per_model["task"] == MACRO) & (per_model["policy"] != "full")]
            macro = macro[macro["budget_kind"].isin(kinds)]
            if MACRO in panels and macro.empty:
                print(f"score_vs_budget_average{_suffix(kind)}__{safe(model)}: not drawn, no policy has every task")
            elif MACRO in panels:
                fig = Figure(figsize=(7, 5.5), layout="constrained")
                ax = fig.subplots()
                _draw(ax, per_model[per_model["task"] == MACRO], kind, labels, _score)
                _axis(ax, per_model, kind)
                ax.set_ylabel(f"score, macro average over {len(tasks)} tasks")
                ax.set_title(f"{model}: score vs KV budget (95% bootstrap CI)")
                figure_legend(fig, [ax])
                out[f"score_vs_budget_average{_suffix(kind)}__{safe(model)}"] = fig
    return out


def _efficiency_figure(
    df: pd.DataFrame, name: str, title: str, panels: list[tuple[str, Callable[[pd.DataFrame], Any]]]
) -> Output:
    """One figure per model and budget axis, a panel per (y label, value) of ``efficiency``."""
    eff = efficiency(df)
    out: Output = {}
    for model, per_model in eff.groupby("model", sort=True):
        kept = [(label, value) for label, value in panels if per_model.pipe(value).notna().any()]
        if not kept:
            continue
        labels = short_labels(per_model)
        for kind in _kinds(per_model):
            fig, axes = panel_grid(len(kept))
            for ax, (label, value) in zip(axes, kept, strict=True):
                _draw(ax, per_model, kind, labels, value)
                _axis(ax, per_model, kind)
                ax.set_ylabel(label)
            fig.suptitle(f"{model}: {title}, mean over tasks")
            figure_legend(fig, axes)
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
        for record in predictions(row)
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
        fig, axes = panel_grid(len(maps), width=3.2, height=3.6)
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
    lines = summary(df) if lines is None else lines
    out: Output = {}
    for builder in (score_vs_budget, memory_vs_budget, throughput_vs_budget, attention_mass_vs_budget):
        out.update(builder(df, lines))
    out.update(kept_heatmaps(df))
    return out
