"""The seed-methods table: passkey and needle score by context length, achieved kept fraction in every cell.

One row per (policy, budget) (full cache first), one column per (task, length).
Usage: python scripts/table_scores_by_length.py [RESULTS_DIR] [--out DIR] (defaults: results, RESULTS_DIR/figures)
"""

import sys

from kvbench.analysis.cli import script

if __name__ == "__main__":
    sys.exit(script("table_scores_by_length"))
