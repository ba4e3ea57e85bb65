#!/usr/bin/env bash
# Fault-tolerant training with torchrun: when a worker dies (OOM, a flaky GPU, a killed
# process) torchrun stops the others and restarts the whole group up to MAX_RESTARTS times;
# --resume makes every restart continue from the run folder's last checkpoint.
#
#   launch/torchrun_elastic.sh --dataset pcam --shards shards/pcam --checkpoint-every 500
#   # several nodes: run it on each with NUM_NODES=4 MAIN_PROCESS_IP=<node 0 address>
#
# Env: MAX_RESTARTS [3], NUM_NODES [1], MAIN_PROCESS_IP [127.0.0.1], MAIN_PROCESS_PORT [29500],
# RDZV_ID [RUN_NAME or histodist] (same on all nodes, unique per job), GPUS_PER_NODE,
# MIXED_PRECISION (torchrun reads no accelerate config: set it, or it is detected from the GPU),
# RUN_NAME. Use --checkpoint-every N so that a restart loses at most N steps.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NUM_NODES=${NUM_NODES:-1}
MAX_RESTARTS=${MAX_RESTARTS:-3}
MAIN_PROCESS_IP=${MAIN_PROCESS_IP:-127.0.0.1}
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
RDZV_ID=${RDZV_ID:-${RUN_NAME:-histodist}}

detect_gpus
detect_precision
train_args
export_nccl_env
# Workers restarted by torchrun must not share the rendezvous TCP store with the dead group:
# with it shared (the default since torch 2.5), a restarted group can read the previous
# attempt's addresses and fail to connect (pytorch/pytorch#135712). Seen here with gloo.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# Accelerator() reads the precision from this variable when no accelerate config is in play.
if [[ -n ${MIXED_PRECISION:-} ]]; then export ACCELERATE_MIXED_PRECISION=$MIXED_PRECISION; fi
log "max restarts $MAX_RESTARTS, rendezvous $MAIN_PROCESS_IP:$MAIN_PROCESS_PORT id $RDZV_ID"
log_world "$NUM_NODES" "$GPUS_PER_NODE"
# The c10d rendezvous runs on the first node to arrive at the endpoint; node ranks are
# assigned by the rendezvous, so the same command runs everywhere.
run_launcher torchrun --nnodes "$NUM_NODES" --nproc-per-node "$GPUS_PER_NODE" \
  --max-restarts "$MAX_RESTARTS" --rdzv-backend c10d \
  --rdzv-endpoint "$MAIN_PROCESS_IP:$MAIN_PROCESS_PORT" --rdzv-id "$RDZV_ID" \
  "${TRAIN_ARGS[@]}" "$@"
