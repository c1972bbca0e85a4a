"""``python -m kvbench.plots RESULTS_DIR [--out DIR]``: every figure (PNG + PDF) and paper table (markdown + CSV)
under ``RESULTS_DIR/figures``; the code is in ``kvbench.analysis`` (``figures``, ``papers``, ``cli``)."""

from kvbench.analysis.cli import figures_main

if __name__ == "__main__":
    raise SystemExit(figures_main())
