#!/usr/bin/env bash
# The committed SmolLM2 results (CPU, fp32), in priority order. Each sweep step runs presets of
# kvbench/configs/experiment/smollm2/ (one command each: python -m kvbench -m +experiment=smollm2/<preset>); the
# LESS steps first train the kernels their presets read. Every step is resumable: rerunning skips rows already in
# results.jsonl and resumes half-done tasks from their flushed predictions.
#   scripts/sweep_smollm2.sh [step ...]     steps: baselines longbench ruler bench seed seed6k ruler_all less less_long less_dense less_ppl less_mse
# Two steps can share the 2 CPU cores as two single-threaded processes (OMP_NUM_THREADS=1); their speed columns
# then describe that setting, and scripts/bench_decode.py (step bench, run alone) is the speed reference.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
presets() { for preset in "$@"; do $PY -m kvbench -m "+experiment=smollm2/$preset" progress=false; done; }
steps=${*:-baselines longbench ruler bench seed seed6k ruler_all less less_long less_dense less_ppl less_mse}
kernels_root=${KVBENCH_CACHE:-$HOME/.cache/kvbench}/less
# kernels DIR [train_less.py arguments]: train the LESS kernels in DIR unless they are there
kernels() {
  local dir=$1
  shift
  [ -f "$dir/kernels.safetensors" ] || $PY scripts/train_less.py --out "$dir" "$@"
}
default_kernels() { [ -f "$kernels_root/smollm2_135m_h2o_0.1/kernels.safetensors" ] || make less-kernels; }
lambda_8k=$kernels_root/smollm2_135m_lambda_0.3_w12x8192e10  # LESS kernels, Lambda base at 0.3, the model's length
lambda_8k_kernels() {
  kernels "$lambda_8k" --base lambda --budget 0.3 --windows 12 --window-tokens 8192 --epochs 10 --loss-rows 2048 \
    --spill "${TMPDIR:-/tmp}" --threads 2
}
h2o_2k=$kernels_root/smollm2_135m_h2o_0.1_w12x2048e10  # LESS kernels for the paper's base (H2O) at 0.1, 2k contexts
h2o_2k_kernels() {
  kernels "$h2o_2k" --base h2o --budget 0.1 --windows 12 --window-tokens 2048 --epochs 10 --loss-rows 1024 \
    --spill "${TMPDIR:-/tmp}" --threads 2
}
for step in $steps; do
  case $step in
    baselines)  # issue 3: every baseline x budgets 0.1/0.3/0.5, passkey and needle at 2k/4k
      presets synthetic_full synthetic_baselines ;;
    seed)  # issue 4: the seed papers' methods on the same grid (CORM capped and native, BCT, FastGen's T, LESS)
      default_kernels
      presets synthetic_corm synthetic_fixed synthetic_corm_native synthetic_fastgen synthetic_less ;;
    seed6k)  # issue 4: the table's policies at 6k tokens, so its grid spans 2k-6k
      default_kernels
      presets synthetic6k_table synthetic6k_fixed synthetic6k_full synthetic6k_less synthetic6k_corm_native \
        synthetic6k_fastgen ;;
    longbench)  # issue 5: the three offline LongBench tasks, official protocol, full cache and SnapKV at 0.3
      presets longbench_full longbench_snapkv ;;
    ruler)  # issue 5: RULER-style suite at 4k tokens (1 example per task), full cache and two policies at 0.3
      presets ruler4k_full ruler4k_snapkv_streaming ;;
    ruler_all)  # issue 6: the RULER-style suite at 2k and 4k (1 example per task) for every policy
      for k in 2 4; do presets "ruler${k}k_full" "ruler${k}k_fastgen" "ruler${k}k_policies" "ruler${k}k_fixed"; done ;;
    less)  # issue 4: LESS beyond the default kernels: H2O base at 0.3 / 0.5 (2k-6k), Lambda base at 0.3 (2k/4k),
      # LESS vs H2O at 0.1 on LongBench multi_news, and H2O 0.1 kernels trained on longer windows
      for b in 0.3 0.5; do kernels "$kernels_root/smollm2_135m_h2o_$b" --base h2o --budget $b --lr 1e-2 --threads 1; done
      presets less_h2o_budgets less_h2o_budgets_6k
      kernels "$kernels_root/smollm2_135m_lambda_0.3" --base lambda --budget 0.3 --threads 1
      kernels "$kernels_root/smollm2_135m_lambda_0.3_w24x1024e6" --base lambda --budget 0.3 --threads 1 \
        --windows 24 --window-tokens 1024 --epochs 6
      presets less_lambda less_lambda_w24x1024e6
      default_kernels
      presets less_longbench
      kernels "$kernels_root/smollm2_135m_h2o_0.1_w12x2048e4" --base h2o --budget 0.1 --lr 1e-2 --threads 1 \
        --windows 12 --window-tokens 2048 --epochs 4
      presets less_longbench_w2048 less_w2048 ;;
    less_long)  # issue 4: LESS (Lambda base, 0.3) with kernels trained on windows of the model's full length
      lambda_8k_kernels
      presets less_lambda_8k less_lambda_8k_6k ;;
    less_dense)  # issue 4: LESS against its base on a denser passkey/needle grid (11 depths)
      lambda_8k_kernels
      h2o_2k_kernels
      presets dense_passkey dense_needle ;;
    less_ppl)  # issue 4: perplexity of held-out text (multi_news) under LESS against its base and the base at
      # LESS's memory (plus R/2 = 4 entries per head), the paper's Table-2 measurement, at 2k and 4k prefixes
      lambda_8k_kernels
      for prefix in 2048 4096; do
        $PY scripts/perplexity.py --prefix $prefix --target 256 --docs 8 --threads "${PPL_THREADS:-2}" \
          --out results/less/perplexity_$((prefix / 1024))k --run full --run "streaming_llm budget=0.3" \
          --run "streaming_llm budget=0.3 plus=4" --run "less budget=0.3 base=lambda kernels=$lambda_8k"
      done
      h2o_2k_kernels
      $PY scripts/perplexity.py --prefix 2048 --target 256 --docs 8 --threads "${PPL_THREADS:-2}" \
        --out results/less/perplexity_h2o_2k --run full --run "h2o budget=0.1" --run "h2o budget=0.1 plus=4" \
        --run "less budget=0.1 kernels=$h2o_2k" ;;
    less_mse)  # issue 4: held-out attention-output MSE of LESS kernels by context length (results/less)
      default_kernels
      lambda_short=$kernels_root/smollm2_135m_lambda_0.3
      kernels "$lambda_short" --base lambda --budget 0.3 --threads 2
      $PY scripts/table_less_mse_by_length.py "$kernels_root/smollm2_135m_h2o_0.1" --lengths 512 2048 4096
      lambda_8k_kernels
      $PY scripts/table_less_mse_by_length.py "$lambda_short" "$lambda_8k" --lengths 512 2048 4096 8192
      h2o_2k_kernels
      $PY scripts/table_less_mse_by_length.py "$h2o_2k" --lengths 2048 4096 ;;
    bench)  # issue 3: decode-step time per policy at 4k on CPU, and the ragged-layout comparison
      $PY scripts/bench_decode.py --context 4096 --budget 0.3 --repeats 2 --out results/bench ;;
    *) echo "unknown step '$step'; valid: baselines longbench ruler bench seed seed6k ruler_all less less_long less_dense less_ppl less_mse" >&2; exit 2 ;;
  esac
done
