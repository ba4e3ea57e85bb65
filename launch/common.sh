# Shared by the launch scripts (sourced, never run). Bash only.
#
# Every script is parameterised by environment variables (defaults in brackets):
#   ACCELERATE_CONFIG  accelerate config file           [launch/accelerate_config.yaml]
#   MIXED_PRECISION    bf16 | fp16 | no                 [bf16 on Ampere+ GPUs, fp16 before, else the config's]
#   GPUS_PER_NODE      processes per node               [GPUs visible to nvidia-smi]
#   RUN_NAME           run folder name under --runs-dir [histodist.train's default <dataset>-<model>]
#   TRAIN_MODULE       the Python module launched        [histodist.train]
# Arguments after the script name go to `python -m histodist.train` unchanged.

# The repository root: the scripts live in <root>/launch (or <root>/launch/slurm).
HISTODIST_ROOT=${HISTODIST_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-$HISTODIST_ROOT/launch/accelerate_config.yaml}
TRAIN_MODULE=${TRAIN_MODULE:-histodist.train}

log() { echo "[histodist.launch] $*" >&2; }
die() { echo "[histodist.launch] error: $*" >&2; exit 2; }

# Sets GPUS_PER_NODE (processes per node): the variable when set, else nvidia-smi's count.
detect_gpus() {
  if [[ -z ${GPUS_PER_NODE:-} ]] && command -v nvidia-smi >/dev/null 2>&1; then
    GPUS_PER_NODE=$(nvidia-smi -L | grep -c '^GPU ' || true)
  fi
  GPUS_PER_NODE=${GPUS_PER_NODE##*:}  # tolerate Slurm's "a100:8" form
  [[ ${GPUS_PER_NODE:-} =~ ^[1-9][0-9]*$ ]] \
    || die "no GPU count (GPUS_PER_NODE='${GPUS_PER_NODE:-}'): set GPUS_PER_NODE=<processes per node>"
}

# Sets MIXED_PRECISION unless given: bf16 needs compute capability >= 8.0 (Ampere: A100,
# RTX 30xx and later); older cards (V100, T4, RTX 20xx) get fp16 with loss scaling. Without
# nvidia-smi it stays empty and the accelerate config file decides.
detect_precision() {
  if [[ -z ${MIXED_PRECISION:-} ]] && command -v nvidia-smi >/dev/null 2>&1; then
    local cap
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 || true)
    if [[ $cap =~ ^([0-9]+) ]]; then
      if (( BASH_REMATCH[1] >= 8 )); then MIXED_PRECISION=bf16; else MIXED_PRECISION=fp16; fi
    fi
  fi
  case ${MIXED_PRECISION:-} in
    ""|bf16|fp16|no) ;;
    *) die "MIXED_PRECISION=$MIXED_PRECISION: use bf16, fp16 or no" ;;
  esac
}

# Sets ACCEL_ARGS: `accelerate launch` options shared by all scripts (config, precision).
accelerate_common_args() {
  [[ -f $ACCELERATE_CONFIG ]] || die "$ACCELERATE_CONFIG: no such accelerate config (set ACCELERATE_CONFIG)"
  detect_precision
  ACCEL_ARGS=(--config_file "$ACCELERATE_CONFIG")
  if [[ -n ${MIXED_PRECISION:-} ]]; then ACCEL_ARGS+=(--mixed_precision "$MIXED_PRECISION"); fi
}

# Prints a top-level value of the accelerate config file (quotes stripped), or nothing.
config_value() {
  awk -v key="$1" -F':[[:space:]]*' '$1 == key { v = $2; gsub(/["\047[:space:]]/, "", v); print v; exit }' \
    "$ACCELERATE_CONFIG"
}

# Sets TRAIN_ARGS, the flags every launch puts before the user's: always --resume (a fresh
# start when the run folder has no checkpoint), so a restarted or requeued job continues
# where it stopped. The user's flags come after, so they win.
train_args() {
  TRAIN_ARGS=(-m "$TRAIN_MODULE" --resume)
  if [[ -n ${RUN_NAME:-} ]]; then TRAIN_ARGS+=(--run-name "$RUN_NAME"); fi
}

# The world size decides the global batch: --batch-size is per process, so
#   global batch = --batch-size x world size x --accum-steps.
# histodist.train logs the resolved numbers at start; this line is for the job log.
log_world() {
  local nodes=$1 per_node=$2
  log "nodes=$nodes processes/node=$per_node world size=$((nodes * per_node))" \
      "(global batch = --batch-size x $((nodes * per_node)) x --accum-steps)"
}

# Torch/NCCL settings for debugging and for failing fast instead of hanging on a dead peer.
# NCCL_SOCKET_IFNAME / NCCL_IB_HCA are passed through unchanged when set (e.g. ib0, ^docker,lo).
export_nccl_env() {
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  local var
  for var in NCCL_DEBUG NCCL_DEBUG_SUBSYS NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_DISABLE; do
    if [[ -n ${!var:-} ]]; then log "$var=${!var}"; fi
  done
}

# Runs a launcher (accelerate launch, torchrun) in the background and passes SIGTERM / SIGUSR1
# sent to this script on to the launcher's children, the training processes, which save a
# checkpoint and exit 0; the launcher then sees every worker succeed and exits 0 too. Left to
# the launcher, the signal would end it with status 1 whatever its workers did: torch's
# elastic agent stops the workers and re-raises the signal (SignalException, see
# docs/cluster.md). `docker stop`, Kubernetes and `kill <pid>` signal this script's process.
# Returns the launcher's status.
run_launcher() {
  "$@" &
  local pid=$! status
  # shellcheck disable=SC2064  # the pid is fixed now
  trap "pass_signal TERM $pid" TERM
  # shellcheck disable=SC2064
  trap "pass_signal USR1 $pid" USR1
  # A trapped signal interrupts `wait` (status 128+n); wait again until the launcher is gone.
  while :; do
    status=0
    wait "$pid" || status=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  trap - TERM USR1
  return "$status"
}

pass_signal() {
  log "SIG$1: passed to the training processes (each saves a checkpoint and exits)"
  pkill "-$1" -P "$2" || true
}
