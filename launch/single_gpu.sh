#!/usr/bin/env bash
# Train on one GPU (pick it with CUDA_VISIBLE_DEVICES=<index>).
#
#   launch/single_gpu.sh --dataset pcam --shards shards/pcam --batch-size 256
#
# Env: ACCELERATE_CONFIG [launch/accelerate_config.single_gpu.yaml], MIXED_PRECISION,
# RUN_NAME (see launch/common.sh), PYTHON [python]. Every run passes --resume: re-running the
# same command continues from the run folder's last checkpoint.
#
# One process needs no launcher, and `accelerate launch --num_processes 1` would run the
# trainer as a child without passing SIGTERM on (docker stop, Kubernetes, kill): no checkpoint.
# So this script becomes the trainer (exec), with what accelerate launch takes from the config
# for one process: the mixed precision (MIXED_PRECISION wins) and use_cpu.
set -euo pipefail
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/accelerate_config.single_gpu.yaml}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

accelerate_common_args
train_args
log_world 1 1
export ACCELERATE_MIXED_PRECISION=${MIXED_PRECISION:-$(config_value mixed_precision)}
ACCELERATE_MIXED_PRECISION=${ACCELERATE_MIXED_PRECISION:-no}
if [[ $(config_value use_cpu) == true ]]; then export ACCELERATE_USE_CPU=true; fi
exec "${PYTHON:-python}" "${TRAIN_ARGS[@]}" "$@"
