"""LESS (arXiv 2402.09398): the share of the H2O gap that LESS recovers.

``(less - h2o) / (full - h2o)`` per task and budget, from the rows of less, h2o and the full cache.
Usage: python scripts/fig_less_gap_recovered.py [RESULTS_DIR] [--out DIR] (defaults: results, RESULTS_DIR/figures)
"""

import sys

from kvbench.analysis.cli import script

if __name__ == "__main__":
    sys.exit(script("fig_less_gap_recovered"))
