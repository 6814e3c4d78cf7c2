#!/usr/bin/env bash
# N processes on this machine, one jax.distributed run (CPU: one device per process, gloo
# collectives; GPU: give each process its GPUs with CUDA_VISIBLE_DEVICES before calling this).
#   bash launch/local.sh 2 --config=configs/quickstart.py --workdir=runs/q2p [--config.X=Y ...]
# Each process runs the same `sftjax train`; process 0 writes logs, TensorBoard and results.
set -euo pipefail
N=${1:?usage: launch/local.sh NUM_PROCESSES sftjax-train-args...}
shift
PORT=${SFTJAX_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < N; i++)); do
  SFTJAX_COORDINATOR="localhost:$PORT" SFTJAX_NUM_PROCESSES=$N SFTJAX_PROCESS_ID=$i \
    sftjax train --distributed "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit $status
