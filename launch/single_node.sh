#!/usr/bin/env bash
# Train on every GPU of this machine (DDP, one process per GPU).
#
#   launch/single_node.sh --dataset pcam --shards shards/pcam --batch-size 256
#
# Env: GPUS_PER_NODE [nvidia-smi's count], MAIN_PROCESS_PORT [29500; change it when two jobs
# share a machine], ACCELERATE_CONFIG, MIXED_PRECISION, RUN_NAME (see launch/common.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

detect_gpus
if (( GPUS_PER_NODE == 1 )); then
  exec "$HISTODIST_ROOT/launch/single_gpu.sh" "$@"  # DDP with one process buys nothing
fi
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
accelerate_common_args
train_args
export_nccl_env
log_world 1 "$GPUS_PER_NODE"
run_launcher accelerate launch "${ACCEL_ARGS[@]}" --num_machines 1 --num_processes "$GPUS_PER_NODE" \
  --main_process_port "$MAIN_PROCESS_PORT" "${TRAIN_ARGS[@]}" "$@"
