#!/usr/bin/env bash
# The committed SmolLM2 results (CPU, fp32), in priority order. Every step is resumable: rerunning skips rows
# already in results.jsonl and resumes half-done tasks from their flushed predictions.
#   scripts/sweep_smollm2.sh [step ...]     steps: baselines longbench ruler bench seed seed6k ruler_all less less_long less_dense less_ppl less_mse
# Two steps can share the 2 CPU cores as two single-threaded processes (OMP_NUM_THREADS=1); their speed columns
# then describe that setting, and scripts/bench_decode.py (step bench, run alone) is the speed reference.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
kv() { $PY -m kvbench "$@" progress=false; }
steps=${*:-baselines longbench ruler bench seed seed6k ruler_all less less_long less_dense less_ppl less_mse}
kernels_root=${KVBENCH_CACHE:-$HOME/.cache/kvbench}/less
less_kernels=$kernels_root/smollm2_135m_h2o_0.1/kernels.safetensors
lambda_8k=$kernels_root/smollm2_135m_lambda_0.3_w12x8192e10  # LESS kernels, Lambda base at 0.3, the model's length
lambda_8k_kernels() {
  [ -f "$lambda_8k/kernels.safetensors" ] || $PY scripts/train_less.py --base lambda --budget 0.3 --windows 12 \
    --window-tokens 8192 --epochs 10 --loss-rows 2048 --spill "${TMPDIR:-/tmp}" --threads 2 --out "$lambda_8k"
}
h2o_2k=$kernels_root/smollm2_135m_h2o_0.1_w12x2048e10  # LESS kernels for the paper's base (H2O) at 0.1, 2k contexts
h2o_2k_kernels() {
  [ -f "$h2o_2k/kernels.safetensors" ] || $PY scripts/train_less.py --base h2o --budget 0.1 --windows 12 \
    --window-tokens 2048 --epochs 10 --loss-rows 1024 --spill "${TMPDIR:-/tmp}" --threads 2 --out "$h2o_2k"
}
all_policies=random,knorm,streaming_llm,h2o,scissorhands,tova,snapkv,pyramidkv,corm
# fixed_capacity (BCT's contract: a capacity m that never grows) runs at absolute budgets, all three rules
fixed=(+policy=fixed_capacity policy.rule=sliding_window,replace_lowest,merge budget_tokens=256,512,1024)
for step in $steps; do
  case $step in
    baselines)  # issue 3: every baseline x budgets 0.1/0.3/0.5, passkey and needle at 2k/4k x 3 depths
      out=results/sweeps/synthetic_smollm2
      kv -m task=passkey,needle batch_size=3 results_dir=$out
      kv -m +policy=random,knorm,streaming_llm,h2o,scissorhands,tova,snapkv,pyramidkv budget=0.1,0.3,0.5 \
        task=passkey,needle batch_size=3 results_dir=$out ;;
    seed)  # issue 4: the seed papers' methods on the same grid (CORM native and capped, FastGen's T sweep, LESS)
      out=results/sweeps/synthetic_smollm2
      kv -m +policy=corm budget=0.1,0.3,0.5 task=passkey,needle batch_size=3 results_dir=$out
      kv -m "${fixed[@]}" task=passkey,needle batch_size=3 results_dir=$out
      kv -m +policy=corm task=passkey,needle batch_size=3 results_dir=$out
      kv -m +policy=fastgen policy.recovery=0.91,0.93,0.95,0.98 task=passkey,needle batch_size=3 results_dir=$out
      [ -f "$less_kernels" ] || make less-kernels
      kv -m +policy=less budget=0.1 task=passkey,needle batch_size=3 results_dir=$out ;;
    seed6k)  # issue 4: the table's policies at 6k tokens (3 depths), so its grid spans 2k-6k; budget 0.3 first
      out=results/sweeps/synthetic6k_smollm2
      six='task.lengths=[6144]'
      table=h2o,streaming_llm,snapkv,tova,corm
      kv -m +policy=$table budget=0.3 task=passkey,needle "$six" batch_size=3 results_dir=$out
      kv -m "${fixed[@]}" task=passkey,needle "$six" batch_size=3 results_dir=$out
      kv -m task=passkey,needle "$six" batch_size=3 results_dir=$out
      [ -f "$less_kernels" ] || make less-kernels
      kv -m +policy=less budget=0.1 task=passkey,needle "$six" batch_size=3 results_dir=$out
      kv -m +policy=corm task=passkey,needle "$six" batch_size=3 results_dir=$out
      kv -m +policy=fastgen policy.recovery=0.95 task=passkey,needle "$six" batch_size=3 results_dir=$out
      kv -m +policy=$table budget=0.1,0.5 task=passkey,needle "$six" batch_size=3 results_dir=$out
      kv -m +policy=fastgen policy.recovery=0.91,0.93,0.98 task=passkey,needle "$six" batch_size=3 \
        results_dir=$out ;;
    longbench)  # issue 5: the three offline LongBench tasks, official protocol, full cache and SnapKV at 0.3
      out=results/sweeps/longbench_smollm2
      tasks=longbench/multi_news,longbench/multifieldqa_zh,longbench/passage_retrieval_zh
      kv -m task=$tasks limit=5 batch_size=5 results_dir=$out
      kv -m +policy=snapkv budget=0.3 task=$tasks limit=5 batch_size=5 results_dir=$out ;;
    ruler)  # issue 5: RULER-style suite at 4k tokens (1 example per task), full cache and two policies at 0.3
      out=results/sweeps/ruler4k_smollm2
      kv task=ruler limit=1 results_dir=$out
      kv -m +policy=snapkv,streaming_llm budget=0.3 task=ruler limit=1 results_dir=$out ;;
    ruler_all)  # issue 6: the RULER-style suite at 2k and 4k (1 example per task) for every policy, budget 0.3
      # first, then 0.1 and 0.5
      for length in 2048 4096; do
        out=results/sweeps/ruler$((length / 1024))k_smollm2
        kv task=ruler "task.lengths=[$length]" limit=1 results_dir=$out
        kv -m +policy=fastgen task=ruler "task.lengths=[$length]" limit=1 results_dir=$out
        kv -m +policy=$all_policies budget=0.3 task=ruler "task.lengths=[$length]" limit=1 results_dir=$out
        kv -m "${fixed[@]}" task=ruler "task.lengths=[$length]" limit=1 results_dir=$out
      done
      for length in 2048 4096; do
        out=results/sweeps/ruler$((length / 1024))k_smollm2
        kv -m +policy=$all_policies budget=0.1,0.5 task=ruler "task.lengths=[$length]" limit=1 results_dir=$out
      done ;;
    less)  # issue 4: LESS beyond the default kernels: H2O base at 0.3 / 0.5 (2k-6k), Lambda base at 0.3 (2k/4k),
      # LESS vs H2O at 0.1 on LongBench multi_news (ROUGE-L, the paper's kind of task), and H2O 0.1 kernels
      # trained on longer windows
      for b in 0.3 0.5; do
        [ -f "$kernels_root/smollm2_135m_h2o_$b/kernels.safetensors" ] ||
          $PY scripts/train_less.py --base h2o --budget $b --lr 1e-2 --threads 1
        kv -m +policy=less budget=$b policy.kernels=$kernels_root/smollm2_135m_h2o_$b task=passkey,needle \
          batch_size=3 results_dir=results/sweeps/synthetic_smollm2
        kv -m +policy=less budget=$b policy.kernels=$kernels_root/smollm2_135m_h2o_$b task=passkey,needle \
          'task.lengths=[6144]' batch_size=3 results_dir=results/sweeps/synthetic6k_smollm2
      done
      for suffix in "" _w24x1024e6; do  # the script's defaults, then 24 windows x 1024 tokens x 6 epochs
        lambda_kernels=$kernels_root/smollm2_135m_lambda_0.3$suffix
        [ -z "$suffix" ] && train=() || train=(--windows 24 --window-tokens 1024 --epochs 6 --out "$lambda_kernels")
        [ -f "$lambda_kernels/kernels.safetensors" ] ||
          $PY scripts/train_less.py --base lambda --budget 0.3 --threads 1 "${train[@]}"
        kv -m +policy=less policy.base=lambda policy.kernels=$lambda_kernels budget=0.3 task=passkey,needle \
          results_dir=results/sweeps/synthetic_smollm2
      done
      [ -f "$less_kernels" ] || make less-kernels
      kv -m +policy=h2o,less budget=0.1 task=longbench/multi_news limit=5 batch_size=5 \
        results_dir=results/sweeps/longbench_smollm2
      long_kernels=$kernels_root/smollm2_135m_h2o_0.1_w12x2048e4  # H2O 0.1 trained on 2048-token windows
      [ -f "$long_kernels/kernels.safetensors" ] || $PY scripts/train_less.py --base h2o --budget 0.1 --lr 1e-2 \
        --threads 1 --windows 12 --window-tokens 2048 --epochs 4 --out "$long_kernels"
      kv -m +policy=less budget=0.1 policy.kernels=$long_kernels task=longbench/multi_news limit=5 batch_size=5 \
        results_dir=results/sweeps/longbench_smollm2
      kv -m +policy=less budget=0.1 policy.kernels=$long_kernels task=passkey,needle batch_size=3 \
        results_dir=results/sweeps/synthetic_smollm2 ;;
    less_long)  # issue 4: LESS (Lambda base, 0.3) with kernels trained on windows of the model's full length (8192
      # tokens, the paper's choice; captures spilled to disk), on passkey/needle 2k-6k against StreamingLLM
      lambda_8k_kernels
      kv -m +policy=less policy.base=lambda policy.kernels=$lambda_8k budget=0.3 task=passkey,needle batch_size=3 \
        results_dir=results/sweeps/synthetic_smollm2
      kv -m +policy=less policy.base=lambda policy.kernels=$lambda_8k budget=0.3 task=passkey,needle \
        'task.lengths=[6144]' batch_size=3 results_dir=results/sweeps/synthetic6k_smollm2 ;;
    less_dense)  # issue 4: LESS against its base on a denser passkey/needle grid (11 depths, 3 passkeys per cell):
      # Lambda 0.3 (8192-token kernels) at 2k/4k, H2O 0.1 at 2k; tasks renamed so their rows stay apart from the
      # 3-depth grid
      out=results/sweeps/less_dense_smollm2
      lambda_8k_kernels
      depths='task.depths=[0.05,0.15,0.25,0.35,0.45,0.55,0.65,0.7,0.75,0.85,0.95]'
      for policy in "" "+policy=streaming_llm budget=0.3" \
        "+policy=less policy.base=lambda policy.kernels=$lambda_8k budget=0.3"; do
        kv $policy task=passkey task.name=passkey_dense task.n_per_cell=3 "$depths" batch_size=3 results_dir=$out
        kv $policy task=needle task.name=needle_dense "$depths" batch_size=3 results_dir=$out
      done
      h2o_2k_kernels
      for policy in "+policy=h2o budget=0.1" "+policy=less policy.kernels=$h2o_2k budget=0.1"; do
        kv $policy task=passkey task.name=passkey_dense task.n_per_cell=3 "$depths" 'task.lengths=[2048]' \
          batch_size=3 results_dir=$out
        kv $policy task=needle task.name=needle_dense "$depths" 'task.lengths=[2048]' batch_size=3 results_dir=$out
      done ;;
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
      [ -f "$less_kernels" ] || make less-kernels
      lambda_short=$kernels_root/smollm2_135m_lambda_0.3
      [ -f "$lambda_short/kernels.safetensors" ] || $PY scripts/train_less.py --base lambda --budget 0.3 --threads 2
      $PY scripts/table_less_mse_by_length.py "$(dirname "$less_kernels")" --lengths 512 2048 4096
      lambda_8k_kernels
      $PY scripts/table_less_mse_by_length.py "$lambda_short" "$lambda_8k" --lengths 512 2048 4096 8192
      h2o_2k_kernels
      $PY scripts/table_less_mse_by_length.py "$h2o_2k" --lengths 2048 4096 ;;
    bench)  # issue 3: decode-step time per policy at 4k on CPU, and the ragged-layout comparison
      $PY scripts/bench_decode.py --context 4096 --budget 0.3 --repeats 2 --out results/bench ;;
    *) echo "unknown step '$step'; valid: baselines longbench ruler bench seed seed6k ruler_all less less_long less_dense less_ppl less_mse" >&2; exit 2 ;;
  esac
done
