"""FastGen (arXiv 2310.01801, Table 1 / Fig. 5): score vs pruned KV fraction across T.

FastGen rows (``recovery`` or ``T`` in policy_params) against the fixed-budget policies over their budgets.
Usage: python scripts/fig_fastgen_tradeoff.py [RESULTS_DIR] [--out DIR] (defaults: results, RESULTS_DIR/figures)
"""

import sys

from kvbench.analysis.cli import script

if __name__ == "__main__":
    sys.exit(script("fig_fastgen_tradeoff"))
