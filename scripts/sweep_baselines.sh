#!/usr/bin/env bash
# Issue 3 results: every baseline policy x budgets 0.1/0.3/0.5 on passkey and needle (2k/4k tokens, 3 depths)
# with SmolLM2-135M on CPU, plus the full cache. Resumable: rerun to finish an interrupted sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/sweeps/baselines_smollm2}
PY=.venv/bin/python
$PY -m kvbench -m task=passkey,needle results_dir="$OUT" progress=false
$PY -m kvbench -m +policy=random,knorm,streaming_llm,h2o,tova,snapkv,pyramidkv budget=0.1,0.3,0.5 \
  task=passkey,needle results_dir="$OUT" progress=false
