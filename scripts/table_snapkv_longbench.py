"""SnapKV (arXiv 2404.14469, LongBench table): full cache vs policies at fixed budgets.

Its 16 English/code LongBench tasks as columns, one row per (policy, budget), plus their mean.
Usage: python scripts/table_snapkv_longbench.py [RESULTS_DIR] [--out DIR] (defaults: results, RESULTS_DIR/figures)
"""

import sys

from kvbench.analysis.cli import script

if __name__ == "__main__":
    sys.exit(script("table_snapkv_longbench"))
