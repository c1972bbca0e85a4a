#!/usr/bin/env bash
# The committed SmolLM2 results (CPU, fp32), in priority order. Every step is resumable: rerunning skips rows
# already in results.jsonl and resumes half-done tasks from their flushed predictions.
#   scripts/sweep_smollm2.sh [step ...]     steps: baselines longbench ruler bench seed
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
kv() { $PY -m kvbench "$@" progress=false; }
steps=${*:-baselines longbench ruler bench seed}
for step in $steps; do
  case $step in
    baselines)  # issue 3: every baseline x budgets 0.1/0.3/0.5, passkey and needle at 2k/4k x 3 depths
      out=results/sweeps/synthetic_smollm2
      kv -m task=passkey,needle batch_size=3 results_dir=$out
      kv -m +policy=random,knorm,streaming_llm,h2o,scissorhands,tova,snapkv,pyramidkv budget=0.1,0.3,0.5 \
        task=passkey,needle batch_size=3 results_dir=$out ;;
    seed)  # issue 4: the seed papers' methods on the same grid (CORM native and capped, FastGen's T sweep)
      out=results/sweeps/synthetic_smollm2
      kv -m +policy=corm,fixed_capacity budget=0.1,0.3,0.5 task=passkey,needle batch_size=3 results_dir=$out
      kv -m +policy=corm task=passkey,needle batch_size=3 results_dir=$out
      kv -m +policy=fastgen policy.recovery=0.91,0.95,0.98 task=passkey,needle batch_size=3 results_dir=$out ;;
    longbench)  # issue 5: the three offline LongBench tasks, official protocol, full cache and SnapKV at 0.3
      out=results/sweeps/longbench_smollm2
      tasks=longbench/multi_news,longbench/multifieldqa_zh,longbench/passage_retrieval_zh
      kv -m task=$tasks limit=5 batch_size=5 results_dir=$out
      kv -m +policy=snapkv budget=0.3 task=$tasks limit=5 batch_size=5 results_dir=$out ;;
    ruler)  # issue 5: RULER-style suite at 4k tokens (1 example per task), full cache and two policies at 0.3
      out=results/sweeps/ruler4k_smollm2
      kv task=ruler limit=1 results_dir=$out
      kv -m +policy=snapkv,streaming_llm budget=0.3 task=ruler limit=1 results_dir=$out ;;
    bench)  # issue 3: decode-step time per policy at 4k on CPU, and the ragged-layout comparison
      $PY scripts/bench_decode.py --context 4096 --budget 0.3 --repeats 2 --out results/bench ;;
    *) echo "unknown step '$step'; valid: baselines longbench ruler bench seed" >&2; exit 2 ;;
  esac
done
