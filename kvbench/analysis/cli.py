"""The analysis CLIs: ``python -m kvbench.results DIR`` (summary tables) and ``python -m kvbench.plots DIR``
(every figure and paper table), and ``scripts/fig_*.py`` / ``scripts/table_*.py`` (one paper builder each).

The figure modules (matplotlib) are imported only by the commands that draw, after the Agg backend is chosen.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from kvbench.analysis.load import load, summary
from kvbench.analysis.names import FORMATS
from kvbench.analysis.tables import markdown, write_summaries

if TYPE_CHECKING:
    from kvbench.analysis.figures import Output


def all_outputs(df: pd.DataFrame) -> Output:
    """Every figure and paper table the rows allow (the summary with its bootstrap is computed once)."""
    from kvbench.analysis.figures import main_figures
    from kvbench.analysis.papers import PAPER

    if df.empty:
        return {}
    lines = summary(df)
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
    from kvbench.analysis.figures import save

    formats = tuple(f.strip().lstrip(".") for f in args.formats.split(",") if f.strip())
    written = save(outputs, args.out or Path(args.results_dir) / "figures", formats)
    for stem, item in outputs.items():
        if isinstance(item, pd.DataFrame):
            print(f"\n{stem}\n\n{markdown(item)}")
    print(f"wrote {len(written)} files to {written[0].parent}")


def script(name: str, argv: list[str] | None = None) -> int:
    """Entry of ``scripts/<name>.py``: build one paper figure or table from a results dir."""
    import matplotlib

    matplotlib.use("Agg")
    from kvbench.analysis.papers import PAPER

    builder, what = PAPER[name]
    args = _parse(argv, f"scripts/{name}.py", builder.__doc__.splitlines()[0])
    df = load(args.results_dir)
    outputs = builder(df) if not df.empty else {}
    if not outputs:
        print(f"no results for {what} yet (in {args.results_dir})")
        return 0
    _report(outputs, args)
    return 0


def figures_main(argv: list[str] | None = None) -> int:
    """``python -m kvbench.plots RESULTS_DIR``: every figure and paper table, regenerated from the rows."""
    import matplotlib

    matplotlib.use("Agg")
    args = _parse(
        argv,
        "python -m kvbench.plots",
        "Figures and paper tables, drawn from results rows and predictions only (never a model).",
    )
    df = load(args.results_dir)
    if df.empty:
        print("no results yet")
        return 0
    _report(all_outputs(df), args)
    return 0


def summary_main(argv: list[str] | None = None) -> int:
    """``python -m kvbench.results RESULTS_DIR``: score and efficiency tables under ``RESULTS_DIR/summary``."""
    parser = argparse.ArgumentParser(
        prog="python -m kvbench.results", description="Read results rows back: summary tables with CIs."
    )
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
