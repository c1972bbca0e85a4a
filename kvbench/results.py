"""``python -m kvbench.results RESULTS_DIR [--out DIR]``: score and efficiency tables (markdown + CSV) under
``RESULTS_DIR/summary``; the code is in ``kvbench.analysis`` (``load``, ``tables``, ``cli``)."""

from kvbench.analysis.cli import summary_main

if __name__ == "__main__":
    raise SystemExit(summary_main())
