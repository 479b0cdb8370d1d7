#!/bin/bash
# DeepSpeed's launcher over the hosts of a hostfile ("node1 slots=8" per line), resuming from $SAVE.
#
#   HOSTFILE=hostfile launch/pretrain_gpt_deepspeed.sh --config configs/gpt_tiny.yaml --data-path ... \
#       --deepspeed_config configs/deepspeed/zero2.json
set -euo pipefail
cd "$(dirname "$0")/.."
SAVE=${SAVE:-checkpoints/megalm-deepspeed}
LOAD=()
[ -f "$SAVE/latest_checkpointed_iteration.txt" ] && LOAD=(--load "$SAVE")
HOSTS=()
[ -n "${HOSTFILE:-}" ] && HOSTS=(--hostfile "$HOSTFILE")
export CUDA_DEVICE_MAX_CONNECTIONS=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec deepspeed "${HOSTS[@]}" --master_port "${MASTER_PORT:-29500}" megalm/pretrain.py --deepspeed "$@" \
  --save "$SAVE" "${LOAD[@]}"
