#!/usr/bin/env bash
# sftjax on a Cloud TPU VM slice with several hosts (e.g. v5e-32: 8 hosts x 4 chips), driven from
# your own machine with gcloud:
#   TPU_NAME=my-pod ZONE=us-west4-a [PROJECT=my-project] \
#     bash launch/tpu_pod.sh [--dry-run] --config=configs/quickstart.py --workdir=runs/pod [--config.X=Y ...]
# Every step is one gcloud command on all hosts of the slice (--worker=all):
#   1. make ~/$REMOTE_DIR and copy the code there (pyproject.toml, README.md, sftjax/, configs/,
#      launch/), plus the --config file when it lives outside configs/ (then --config names the copy);
#   2. make a venv there and `pip install -e . "jax[tpu]"` (jax's TPU extra, within sftjax's jax pin);
#   3. start `sftjax train --distributed ARGS` in the background on every host (launch/_tpu_host.sh),
#      output to ~/$REMOTE_DIR/train.log; jax.distributed finds the other hosts from the TPU metadata;
#   4. stream host 0's log until its run ends, and exit with that run's status.
# Ctrl-C during step 4 stops the streaming only; the run goes on (step 4's command watches it
# again). To stop the run (every host saves the checkpoint, then exits):
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
#     --command='bash sftjax/launch/_tpu_host.sh stop'
# --dry-run (first argument only) prints the commands, one per line, instead of running them.
# Environment: TPU_NAME and ZONE (required), PROJECT (default: gcloud's configured project),
# REMOTE_DIR (default sftjax, under each host's home), PYTHON (on the hosts: Python >= 3.11 with
# venv; default python3), SFTJAX_TIMEOUT_S (passed on when set; see sftjax/parallel/distributed.py).
# --workdir is a path on each host; checkpoints of a multi-host run need one folder that all hosts
# share (e.g. a Filestore/NFS mount at the same path on every host).
set -euo pipefail
DRY_RUN=0
if [[ ${1:-} == --dry-run ]]; then
  DRY_RUN=1
  shift
fi
if [[ -z ${TPU_NAME:-} || -z ${ZONE:-} ]]; then
  echo "launch/tpu_pod.sh: set TPU_NAME and ZONE to the TPU VM slice (and PROJECT unless gcloud's default" \
    "project owns it), e.g. TPU_NAME=my-pod ZONE=us-west4-a bash launch/tpu_pod.sh --config=... --workdir=..." >&2
  exit 2
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REMOTE_DIR=${REMOTE_DIR:-sftjax}
PYTHON=${PYTHON:-python3}
where=(--zone="$ZONE")
if [[ -n ${PROJECT:-} ]]; then where+=(--project="$PROJECT"); fi

# shellcheck source-path=SCRIPTDIR source=_quote.sh
. "$(dirname "${BASH_SOURCE[0]}")/_quote.sh"
step() { # print (--dry-run) or run one command
  if ((DRY_RUN)); then
    words "$@"
    echo
  else
    echo "+ $(words "$@")" >&2
    "$@"
  fi
}

# The --config file: under configs/ it travels with the code; anywhere else it is copied on its own.
args=() extra=()
take_config=0
for a in "$@"; do
  path=
  if ((take_config)); then
    path=$a
    take_config=0
  elif [[ $a == --config ]]; then
    args+=("$a")
    take_config=1
    continue
  elif [[ $a == --config=* ]]; then
    path=${a#--config=}
  fi
  if [[ -z $path ]]; then
    args+=("$a")
    continue
  fi
  if [[ ! -f $path ]]; then
    echo "launch/tpu_pod.sh: --config file $path not found" >&2
    exit 2
  fi
  abs="$(cd "$(dirname "$path")" && pwd -P)/$(basename "$path")"
  if [[ $abs == "$(cd "$ROOT" && pwd -P)/configs/"* ]]; then
    remote_config=configs/${abs#"$(cd "$ROOT" && pwd -P)/configs/"}
  else
    extra+=("$abs")
    remote_config=$(basename "$abs")
  fi
  if [[ $a == --config=* ]]; then args+=("--config=$remote_config"); else args+=("$remote_config"); fi
done

host="bash $(q "$REMOTE_DIR")/launch/_tpu_host.sh"
env_prefix=
if [[ -n ${SFTJAX_TIMEOUT_S:-} ]]; then env_prefix="SFTJAX_TIMEOUT_S=$(q "$SFTJAX_TIMEOUT_S") "; fi
ssh=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}")
step "${ssh[@]}" --worker=all --command="mkdir -p $(q "$REMOTE_DIR")"
step gcloud compute tpus tpu-vm scp --recurse "${where[@]}" --worker=all "$ROOT/pyproject.toml" "$ROOT/README.md" \
  "$ROOT/sftjax" "$ROOT/configs" "$ROOT/launch" ${extra[@]+"${extra[@]}"} "$TPU_NAME:$REMOTE_DIR/"
step "${ssh[@]}" --worker=all --command="cd $(q "$REMOTE_DIR") && $(q "$PYTHON") -m venv .venv && .venv/bin/pip install -q -e . \"jax[tpu]\""
step "${ssh[@]}" --worker=all --command="$env_prefix$host start${args[*]+ $(words "${args[@]}")}"
step "${ssh[@]}" --worker=0 --command="$host follow"
