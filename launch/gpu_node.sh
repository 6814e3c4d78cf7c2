#!/usr/bin/env bash
# sftjax on one machine with several GPUs: one process that drives all of them.
#   bash launch/gpu_node.sh [--dry-run] --config=configs/x.py --workdir=runs/x [--config.X=Y ...]
#   GPUS=4 bash launch/gpu_node.sh ...   # only the first 4 GPUs
# Why one process and not one per GPU: on a single host JAX sees every local GPU from one process
# (jax.devices() lists them all), and the mesh (mesh.data=-1 by default) spans them, with NCCL
# collectives inside the compiled step. JAX's multi-process mode (jax.distributed, one process per
# host or per GPU) exists for accelerators spread over several hosts: see launch/slurm.sbatch or
# launch/tpu_pod.sh. One process also means one copy of the data pipeline and the tokenizer, and
# no coordinator to lose.
# The GPU count is GPUS if set, else the entries of CUDA_VISIBLE_DEVICES if set, else the lines of
# `nvidia-smi -L`; the command sets CUDA_VISIBLE_DEVICES to those GPUs (the first GPUS of an
# already set CUDA_VISIBLE_DEVICES, else 0..GPUS-1).
# --dry-run (first argument only) prints the command instead of running it.
set -euo pipefail
DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then
  DRY_RUN=1
  shift
fi
visible=()
if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"; fi
if [[ -n ${GPUS:-} ]]; then
  gpus=$GPUS
elif ((${#visible[@]})); then
  gpus=${#visible[@]}
elif command -v nvidia-smi > /dev/null; then
  gpus=$(nvidia-smi -L | grep -c '^GPU ' || true)
else
  echo "launch/gpu_node.sh: no nvidia-smi here to count the GPUs; set GPUS=N" >&2
  exit 2
fi
if ! [[ $gpus =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/gpu_node.sh: found no GPU (GPUS='${GPUS:-}', nvidia-smi -L); set GPUS=N" >&2
  exit 2
fi
if ((${#visible[@]})); then
  if ((gpus > ${#visible[@]})); then
    echo "launch/gpu_node.sh: GPUS=$gpus but CUDA_VISIBLE_DEVICES shows only ${#visible[@]}" >&2
    exit 2
  fi
  devices=$(IFS=,; echo "${visible[*]:0:gpus}")
else
  devices=$(seq -s, 0 $((gpus - 1)))
fi
cmd=(env "CUDA_VISIBLE_DEVICES=$devices" sftjax train "$@")
if ((DRY_RUN)); then
  # shellcheck source-path=SCRIPTDIR source=_quote.sh
  . "$(dirname "${BASH_SOURCE[0]}")/_quote.sh"
  words "${cmd[@]}"
  echo
  exit 0
fi
echo "launch/gpu_node.sh: 1 process on $gpus GPU(s): ${cmd[*]}" >&2
exec "${cmd[@]}"
