#!/usr/bin/env bash
# Train on one GPU (pick it with CUDA_VISIBLE_DEVICES=<index>).
#
#   launch/single_gpu.sh --dataset pcam --shards shards/pcam --batch-size 256
#
# Env: ACCELERATE_CONFIG [launch/accelerate_config.single_gpu.yaml], MIXED_PRECISION,
# RUN_NAME (see launch/common.sh). Every run passes --resume: re-running the same command
# continues from the run folder's last checkpoint.
set -euo pipefail
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/accelerate_config.single_gpu.yaml}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

accelerate_common_args
train_args
log_world 1 1
exec accelerate launch "${ACCEL_ARGS[@]}" --num_processes 1 --num_machines 1 \
  "${TRAIN_ARGS[@]}" "$@"
