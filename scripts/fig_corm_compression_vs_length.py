"""CORM (arXiv 2404.15949, Fig. 4): the KV fraction CORM keeps vs prompt length.

Reads the per-example ``kv_kept_fraction`` and ``n_prompt_tokens`` of every ``policy=corm`` row.
Usage: python scripts/fig_corm_compression_vs_length.py [RESULTS_DIR] [--out DIR]
(defaults: results, RESULTS_DIR/figures)
"""

import sys

from kvbench.analysis.cli import script

if __name__ == "__main__":
    sys.exit(script("fig_corm_compression_vs_length"))
