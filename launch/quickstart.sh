#!/usr/bin/env bash
# The main job on the built-in default, offline on CPU: corpus -> tokenizer -> preprocess -> train -> sample.
# For a shorter run (the test suite's): QUICKSTART_SKIP_INSTALL=1 (install already done), QUICKSTART_CORPUS_MB,
# QUICKSTART_TRAIN_ITERS (validation every QUICKSTART_TRAIN_ITERS / 3), QUICKSTART_DIR (default runs/quickstart).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${QUICKSTART_SKIP_INSTALL:-}" ] || bash scripts/install.sh
PY=.venv/bin/python
OUT=${QUICKSTART_DIR:-runs/quickstart}
SHORT=()
if [ -n "${QUICKSTART_TRAIN_ITERS:-}" ]; then
  SHORT=(--train-iters "$QUICKSTART_TRAIN_ITERS" --eval-interval $(( (QUICKSTART_TRAIN_ITERS + 2) / 3 )))
fi
mkdir -p "$OUT"
$PY -m megalm.tools.build_corpus --output "$OUT/corpus.jsonl" --max-mb "${QUICKSTART_CORPUS_MB:-8}"
$PY -m megalm.tools.train_tokenizer --input "$OUT/corpus.jsonl" --type bpe --vocab-size 8192 --output-dir "$OUT/tokenizer"
$PY -m megalm.tools.preprocess_data --input "$OUT/corpus.jsonl" --output-prefix "$OUT/corpus" \
  --tokenizer-type GPT2BPETokenizer --vocab-file "$OUT/tokenizer/vocab.json" --merge-file "$OUT/tokenizer/merges.txt" \
  --append-eod --workers 2
rm -rf "$OUT/checkpoints" "$OUT/metrics.jsonl" "$OUT/tensorboard"
# tensor parallelism 2 x pipeline parallelism 2 over 4 processes (gloo on CPU), one thread each; micro-batches
# of 4 give the 1F1B schedule 4 micro-batches per step (ideal bubble (P - 1) / (m + P - 1) = 20%)
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} $PY -m torch.distributed.run --standalone --nproc_per_node 4 megalm/pretrain.py \
  --config configs/gpt_tiny.yaml --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
  --micro-batch-size 4 --data-path "$OUT/corpus_text_document" \
  --vocab-file "$OUT/tokenizer/vocab.json" --merge-file "$OUT/tokenizer/merges.txt" \
  --save "$OUT/checkpoints" --metrics-file "$OUT/metrics.jsonl" --tensorboard-dir "$OUT/tensorboard" "${SHORT[@]}"
$PY -m megalm.tools.summarize_metrics "$OUT/metrics.jsonl"
$PY -m megalm.tools.plot "$OUT/metrics.jsonl" -o "$OUT/curves.png" --labels "TP 2 x PP 2"  # loss, lr, ... curves
$PY -m megalm.generate --load "$OUT/checkpoints" --max-new-tokens 60 --temperature 0.7 --top-p 0.9 \
  --prompt "Return a new list" --prompt "The file object"
