#!/usr/bin/env bash
# The GPU check, one command on a CUDA machine with no network: installs megalm against the torch already there
# (--no-deps --no-build-isolation), builds the CUDA kernels, runs the GPU tests, trains a 1.3B GPT in bf16 through
# the real entry point (tokens/s and MFU from its metrics), runs bench/bench_mfu.py (bf16 parameters, then bf16
# autocast over fp32 parameters as the reference: MFU and peak memory of each), FP8 in each recipe against
# that bf16 step, torch.compile against eager (bench_compile.py), megalm against megatron-core
# (bench_vs_megatron.py; TP 2 / PP 2 and FSDP2 vs ZeRO 1 vs DeepSpeed ZeRO 3 when there are 2+ GPUs), and
# generates text from the trained checkpoint. Every step's exit status, time and last lines go to one results file.
#
#   bash scripts/gpu_check.sh [RESULTS]          # default: $OUT/gpu_check.txt where $OUT is set, else gpu_check.txt
#   GPU_CHECK_SMOKE=1 bash scripts/gpu_check.sh  # tiny sizes on CPU, no install: checks the script (the suite does)
#   GPU_CHECK_COMPILE=1 ...                      # also bench_mfu.py with torch.compile (minutes of compilation)
#
# Exit status: 0 when every step passed. About 8-9 minutes on one H100/H200 (estimated: FP8 and compile add ~2).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:+$OUT/}gpu_check.txt}
PY=${PYTHON:-python3}
SMOKE=${GPU_CHECK_SMOKE:-}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
: > "$RESULTS"
failed=0

step() {  # step NAME COMMAND...: run it, keep its last lines and its exit status in the results
  local name=$1 start=$SECONDS rc
  shift
  echo "== $name" | tee -a "$RESULTS"
  "$@" > "$WORK/step.log" 2>&1
  rc=$?
  tail -n 30 "$WORK/step.log" | tee -a "$RESULTS"
  echo "== $name: exit $rc, $((SECONDS - start)) s" | tee -a "$RESULTS"
  [ "$rc" -eq 0 ] || failed=1
}

if [ -n "$SMOKE" ]; then
  SHAPE=(--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 128)
  VOCAB=1024 ITERS=6 MBS=2 GBS=4 BENCH=(--smoke) SHORT=(--smoke)
else
  SHAPE=(--num-layers 24 --hidden-size 2048 --num-attention-heads 16 --seq-length 2048)
  VOCAB=50304 ITERS=30 MBS=4 GBS=8 BENCH=(--iters 20) SHORT=(--iters 12)
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  step "machine" bash -c "nvidia-smi -L; $PY -c 'import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'"
  step "install megalm (CUDA kernels built against this torch)" \
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
  step "CUDA extension" "$PY" -c "from megalm.kernels import extension as e; x = e(); assert x is not None and x.with_cuda, 'megalm._C has no CUDA kernels'; print('megalm._C with CUDA')"
  step "GPU tests" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py tests/test_fused_softmax.py
fi

step "random-token dataset" "$PY" -c "import sys; sys.path.insert(0, 'bench'); from bench_mfu import random_dataset; \
random_dataset('$WORK', $VOCAB, ($ITERS + 2) * $GBS * (int('${SHAPE[7]}') + 1) * 2)"
step "train ${SHAPE[*]} in bf16, $ITERS iterations (python -m megalm.pretrain)" \
  "$PY" -m megalm.pretrain "${SHAPE[@]}" --micro-batch-size "$MBS" --global-batch-size "$GBS" --bf16 \
  --train-iters "$ITERS" --eval-iters 0 --split 100,0,0 --lr 1e-4 --lr-warmup-iters 2 --log-interval 5 \
  --data-path "$WORK/random_text_document" --tokenizer-type NullTokenizer --vocab-size $((VOCAB - 1)) \
  --save "$WORK/ck" --metrics-file "$WORK/metrics.jsonl"
step "training throughput (median of the last two thirds)" "$PY" -c "
import json, statistics
rows = [r for r in map(json.loads, open('$WORK/metrics.jsonl')) if 'loss' in r]
rows = rows[len(rows) // 3:]
for key in ('tokens_per_sec', 'tflops_per_device', 'mfu', 'ms_per_iter'):
    if key in rows[0]:
        print(key, round(statistics.median(r[key] for r in rows), 4))
print('loss', rows[0]['loss'], '->', rows[-1]['loss'])"
step "bench/bench_mfu.py (bf16 parameters)" "$PY" bench/bench_mfu.py "${BENCH[@]}"
step "bench/bench_mfu.py --precision autocast (the reference for bf16 parameters)" \
  "$PY" bench/bench_mfu.py "${BENCH[@]}" --precision autocast
for recipe in tensorwise rowwise mxfp8; do  # MXFP8 is emulated below Blackwell (same numbers, no speed-up)
  step "bench/bench_mfu.py --fp8-recipe $recipe (FP8 hybrid against the bf16 step above: tokens/s, loss)" \
    "$PY" bench/bench_mfu.py "${SHORT[@]}" --fp8-recipe "$recipe"
done
if [ -z "$SMOKE" ]; then
  step "bench/bench_compile.py (each block compiled against eager)" "$PY" bench/bench_compile.py --iters 12
  GPUS=$(nvidia-smi -L | wc -l)
  if [ "$GPUS" -ge 2 ]; then
    step "bench/bench_vs_megatron.py (1 GPU, TP 2, PP 2)" "$PY" bench/bench_vs_megatron.py --iters 10
    for opt in "--use-torch-fsdp2" "--use-distributed-optimizer" "--deepspeed --deepspeed_config configs/deepspeed/zero3.json"; do
      # shellcheck disable=SC2086
      step "${SHAPE[*]} bf16 over $GPUS GPUs with $opt (tokens/s, memory per rank)" \
        "$PY" -m torch.distributed.run --standalone --nproc-per-node "$GPUS" megalm/pretrain.py "${SHAPE[@]}" \
        --micro-batch-size "$MBS" --global-batch-size $((MBS * GPUS)) --bf16 --train-iters 10 --eval-iters 0 \
        --split 100,0,0 --lr 1e-4 --log-interval 5 --data-path "$WORK/random_text_document" \
        --tokenizer-type NullTokenizer --vocab-size $((VOCAB - 1)) $opt
    done
  else
    step "bench/bench_vs_megatron.py (1 GPU; TP 2 / PP 2 and FSDP2 vs ZeRO 1 vs ZeRO 3 need 2 GPUs)" \
      "$PY" bench/bench_vs_megatron.py --layouts 1 --iters 10
  fi
fi
if [ -n "${GPU_CHECK_COMPILE:-}" ] && [ -z "$SMOKE" ]; then
  step "bench/bench_mfu.py --compile" "$PY" bench/bench_mfu.py "${BENCH[@]}" --compile
fi
step "generate from the trained checkpoint (KV cache)" "$PY" -m megalm.generate --load "$WORK/ck" \
  --prompt "1 2 3 4 5" --prompt "7 7 7" --max-new-tokens 32 --no-stop-at-eod
echo "gpu_check: $([ $failed -eq 0 ] && echo 'all steps passed' || echo 'some steps FAILED'); results in $RESULTS" \
  | tee -a "$RESULTS"
exit $failed
