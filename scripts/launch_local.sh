#!/usr/bin/env bash
# Multi-process training on one machine, as on a pod: N processes of `python -m st_moe_jax.train ARGS...`
# joined by jax.distributed over localhost, each with LAUNCH_DEVICES/N simulated CPU devices (default 8
# in all) and its own data shard (seqio.ShardInfo by process index).
#
#   scripts/launch_local.sh 2 --gin_file=gin/runs/pretrain.gin --gin_file=gin/models/st_moe_tiny.gin ...
#
# It waits for all of them and exits with the first failure's status; when one process fails, the others
# are killed (a pod's peers would otherwise wait on it until the heartbeat timeout). SIGTERM / SIGINT are
# passed on to every process, as a pod's preemption reaches every host.
# Environment: PYTHON (default python3), LAUNCH_DEVICES (default 8), LAUNCH_MODULE (default
# st_moe_jax.train; st_moe_jax.evaluate and st_moe_jax.infer take the same flags).
set -u

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES TRAIN_FLAGS..." >&2
  exit 2
fi
num=$1
shift
devices=${LAUNCH_DEVICES:-8}
if (( devices % num )); then
  echo "ERROR: LAUNCH_DEVICES=$devices must be divisible by NUM_PROCESSES=$num (each process gets" \
       "LAUNCH_DEVICES/NUM_PROCESSES CPU devices)." >&2
  exit 2
fi
python=${PYTHON:-python3}
module=${LAUNCH_MODULE:-st_moe_jax.train}
# A free port for the coordinator (process 0 serves it).
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

pids=()
for ((i = 0; i < num; i++)); do
  # Last: it overrides a device count already in XLA_FLAGS.
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$((devices / num))" JAX_PLATFORMS=cpu \
    "$python" -m "$module" --coordinator_address="127.0.0.1:$port" --process_count="$num" \
    --process_index="$i" "$@" &
  pids+=($!)
done

forward() {  # preemption: every process gets the signal, as every host of a pod does
  kill -"$1" "${pids[@]}" 2>/dev/null
}
trap 'forward TERM' TERM
trap 'forward INT' INT

# Poll (not `wait -n`, which does not say which process ended): a failure kills the rest at once.
status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
      continue
    fi
    wait "$pid"
    rc=$?
    if ((rc != 0 && status == 0)); then
      status=$rc
    fi
  done
  running=("${still[@]}")
  if ((status != 0 && ${#running[@]} > 0)); then
    echo "launch_local.sh: a process exited with status $status; stopping the other ${#running[@]}." >&2
    kill -KILL "${running[@]}" 2>/dev/null
  fi
  sleep 0.2
done
exit "$status"
