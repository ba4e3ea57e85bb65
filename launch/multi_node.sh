#!/usr/bin/env bash
# Multi-node training with plain `accelerate launch`: run this script once on EVERY node, with
# the same arguments, NODE_RANK 0 on the node whose address is MAIN_PROCESS_IP.
#
#   # on node 0 (10.0.0.1) and node 1:
#   NUM_NODES=2 NODE_RANK=0 MAIN_PROCESS_IP=10.0.0.1 launch/multi_node.sh --dataset pcam ...
#   NUM_NODES=2 NODE_RANK=1 MAIN_PROCESS_IP=10.0.0.1 launch/multi_node.sh --dataset pcam ...
#
# Env: NUM_NODES (required), NODE_RANK [SLURM_NODEID], MAIN_PROCESS_IP (required; reachable
# from every node), MAIN_PROCESS_PORT [29500], GPUS_PER_NODE [nvidia-smi's count],
# NCCL_SOCKET_IFNAME / NCCL_IB_HCA (passed through), NCCL_DEBUG [WARN], ACCELERATE_CONFIG,
# MIXED_PRECISION, RUN_NAME. The run folder (--runs-dir) must be on storage all nodes share:
# rank 0 writes checkpoints and every rank reads them on --resume.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${NUM_NODES:?set NUM_NODES (number of machines)}"
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-}}
: "${NODE_RANK:?set NODE_RANK (0 .. NUM_NODES-1) on each node}"
: "${MAIN_PROCESS_IP:?set MAIN_PROCESS_IP (address of the NODE_RANK 0 machine)}"
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
(( NODE_RANK >= 0 && NODE_RANK < NUM_NODES )) || die "NODE_RANK=$NODE_RANK not in 0..$((NUM_NODES - 1))"

detect_gpus
accelerate_common_args
train_args
export_nccl_env
log "node $NODE_RANK of $NUM_NODES, main process $MAIN_PROCESS_IP:$MAIN_PROCESS_PORT"
log_world "$NUM_NODES" "$GPUS_PER_NODE"
# --num_processes is the total over all nodes; accelerate derives the per-node count.
run_launcher accelerate launch "${ACCEL_ARGS[@]}" \
  --num_machines "$NUM_NODES" --machine_rank "$NODE_RANK" \
  --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT" \
  --num_processes "$((NUM_NODES * GPUS_PER_NODE))" --rdzv_backend static --same_network \
  "${TRAIN_ARGS[@]}" "$@"
