#!/usr/bin/env bash
# Runs on each host of a TPU VM slice; launch/tpu_pod.sh calls it there through `gcloud ... ssh`:
#   bash sftjax/launch/_tpu_host.sh start ARGS  start `sftjax train --distributed ARGS` detached from
#                                               the ssh session; output in sftjax/train.log
#   bash sftjax/launch/_tpu_host.sh follow      print train.log until that run ends, exit with its status
#   bash sftjax/launch/_tpu_host.sh stop        SIGTERM to the run: it saves a checkpoint and exits
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case ${1:-} in
  start)
    shift
    rm -f train.status
    # A new session (setsid), so the run outlives the ssh connection; the wrapper waits through a
    # SIGTERM (trap :) and records the run's exit status for `follow`.
    # shellcheck disable=SC2016  # $@ and $? belong to the inner bash
    setsid nohup bash -c 'trap : TERM INT; .venv/bin/sftjax train --distributed "$@" > train.log 2>&1
      echo $? > train.status' sftjax "$@" < /dev/null > /dev/null 2>&1 &
    echo $! > train.pid
    echo "$(hostname): sftjax train started (pid $!), log $PWD/train.log"
    ;;
  follow)
    pid=$(cat train.pid)
    # The run makes train.log as it starts; a tail that opened it only after the run ended could miss it.
    while [[ ! -e train.log ]] && kill -0 "$pid" 2> /dev/null; do sleep 0.2; done
    tail -n +1 --pid="$pid" -F train.log
    exit "$(cat train.status 2>/dev/null || echo 1)"
    ;;
  stop)
    kill -TERM -- "-$(cat train.pid)"
    ;;
  *)
    echo "usage: $0 start SFTJAX-TRAIN-ARGS... | follow | stop" >&2
    exit 2
    ;;
esac
