#!/bin/bash
# Slurm batch script: one task per GPU started by srun (megalm reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID),
# resuming from $SAVE, requeued on preemption. Tasks are the Python processes themselves, so Slurm's signals reach
# them directly (no launcher in between that might die of SIGUSR1).
#
#   sbatch --nodes 4 launch/pretrain_gpt.sh --config configs/llama_tiny.yaml --data-path data/corpus_text_document \
#       --tensor-model-parallel-size 8 --pipeline-model-parallel-size 2 ...
#
# Slurm sends SIGUSR1 120 s before the time limit (--signal); every rank finishes its iteration, the job saves to
# $SAVE and exits 0, leaving $SAVE/requeue_requested, and this script requeues the job, which resumes from $SAVE.
# A hung or dead rank (--hang-timeout-seconds) ends every live rank with exit code 75: requeued the same way,
# resuming from the last complete checkpoint.
#SBATCH --job-name=megalm
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

cd "${MEGALM_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
PYTHON=${PYTHON:-python}
NNODES=${SLURM_NNODES:-1}
TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-8}
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
SAVE=${SAVE:-checkpoints/${SLURM_JOB_NAME:-megalm}}

# NCCL: fail a collective instead of hanging, overlap TP communication with compute
export CUDA_DEVICE_MAX_CONNECTIONS=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

LOAD=()
if [ -f "$SAVE/latest_checkpointed_iteration.txt" ]; then
  LOAD=(--load "$SAVE")
  echo "resuming from $SAVE (iteration $(cat "$SAVE/latest_checkpointed_iteration.txt"))"
fi
rm -f "$SAVE/requeue_requested"

echo "job ${SLURM_JOB_ID:-?}: $NNODES node(s) x $TASKS_PER_NODE tasks, master $MASTER_ADDR:$MASTER_PORT"
rc=0
srun --kill-on-bad-exit=1 --ntasks-per-node="$TASKS_PER_NODE" \
  "$PYTHON" -m megalm.pretrain "$@" --save "$SAVE" "${LOAD[@]}" || rc=$?

# 75: a rank found a hang or a dead peer (megalm.training.watchdog.REQUEUE_EXIT); the marker: a stop on a signal,
# a time limit, a straggler, or that same failure (written by whichever rank saw it first)
if [ "$rc" -eq 75 ] || [ -f "$SAVE/requeue_requested" ]; then
  echo "stopped early (exit code $rc: $(cat "$SAVE/requeue_requested" 2>/dev/null || echo "no marker")): requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"
