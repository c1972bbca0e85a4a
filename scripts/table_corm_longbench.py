"""CORM (arXiv 2404.15949, Tables 1-2): LongBench per task, per category, overall (EN, ZH, all).

One column per (policy, budget) of the LongBench v1 rows; the paper's own numbers were not retrieved.
Usage: python scripts/table_corm_longbench.py [RESULTS_DIR] [--out DIR] (defaults: results, RESULTS_DIR/figures)
"""

import sys

from kvbench.analysis.cli import script

if __name__ == "__main__":
    sys.exit(script("table_corm_longbench"))
