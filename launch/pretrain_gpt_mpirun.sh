#!/bin/bash
# mpirun starts one process per rank; megalm reads its rank from Open MPI's or MPICH's (PMI) variables.
#
#   NP=8 MASTER_ADDR=node1 launch/pretrain_gpt_mpirun.sh --config configs/gpt_tiny.yaml --data-path ...
# (PyPI's `mpich` package provides mpirun: pip install mpich)
set -euo pipefail
cd "$(dirname "$0")/.."
export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1} MASTER_PORT=${MASTER_PORT:-29500} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec mpirun -np "${NP:-2}" -genv MASTER_ADDR "$MASTER_ADDR" -genv MASTER_PORT "$MASTER_PORT" \
  "${PYTHON:-python}" -m megalm.pretrain "$@"
