"""Needle in a haystack (Kamradt's test): score by needle depth x context length, one panel per policy x budget.

Rows of the synthetic tasks (passkey, needle) whose examples record length and depth.
Usage: python scripts/fig_needle_heatmap.py [RESULTS_DIR] [--out DIR] (defaults: results, RESULTS_DIR/figures)
"""

import sys

from kvbench.analysis.cli import script

if __name__ == "__main__":
    sys.exit(script("fig_needle_heatmap"))
