#!/usr/bin/env bash
# N processes on this machine, one jax.distributed run (CPU: one device per process, gloo
# collectives; GPU: give each process its GPUs with CUDA_VISIBLE_DEVICES before calling this).
#   bash launch/local.sh 2 --config=configs/quickstart.py --workdir=runs/q2p [--config.X=Y ...]
# Each process runs the same `sftjax train --distributed`; process 0 writes logs, TensorBoard and
# results. SFTJAX_PORT picks the coordinator port (default: random in 20000-39999).
#
# If one process fails or dies, the others cannot go on (their collectives wait for it): this
# script names it, sends the others SIGTERM, SIGKILL 5 s later, and exits with the failed process's
# status. A SIGTERM to this script is passed on to every process (each saves a checkpoint and
# exits); Ctrl-C reaches them directly. Written for bash >= 3.2 (macOS's too): no `wait -n`.
set -uo pipefail
N=${1:?usage: launch/local.sh NUM_PROCESSES sftjax-train-args...}
shift
if ! [[ $N =~ ^[1-9][0-9]*$ ]]; then
  echo "launch/local.sh: NUM_PROCESSES must be a positive integer, got '$N'" >&2
  exit 2
fi
PORT=${SFTJAX_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < N; i++)); do
  SFTJAX_COORDINATOR="localhost:$PORT" SFTJAX_NUM_PROCESSES=$N SFTJAX_PROCESS_ID=$i \
    sftjax train --distributed "$@" &
  pids[i]=$!
  echo "launch/local.sh: process $i is pid $!" >&2
done

signal_all() {
  for pid in "${pids[@]}"; do
    kill "-$1" "$pid" 2>/dev/null || true
  done
}
trap 'signal_all TERM' TERM
trap ':' INT # keep waiting: Ctrl-C already reached every process (same process group)

status=0
kill_at=
while ((${#pids[@]})); do
  for i in "${!pids[@]}"; do
    pid=${pids[i]}
    kill -0 "$pid" 2>/dev/null && continue
    wait "$pid"
    rc=$?
    unset "pids[i]"
    if ((rc != 0 && status == 0)); then
      status=$rc
      how="status $rc"
      if ((rc > 128)); then how="$how (signal $(kill -l $((rc - 128)) 2>/dev/null || echo $((rc - 128))))"; fi
      if ((${#pids[@]})); then
        echo "launch/local.sh: process $i (pid $pid) exited with $how; stopping the other ${#pids[@]}" >&2
        signal_all TERM
        kill_at=$((SECONDS + 5))
      else
        echo "launch/local.sh: process $i (pid $pid) exited with $how" >&2
      fi
    fi
  done
  if [[ -n $kill_at ]] && ((SECONDS >= kill_at && ${#pids[@]})); then
    signal_all KILL
    kill_at=
  fi
  ((${#pids[@]})) && sleep 0.2
done
exit "$status"
