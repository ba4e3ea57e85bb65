#!/usr/bin/env bash
# The GPU check, `python -m histodist.bench gpu`, on a CUDA machine that lacks the repository's
# data sample or webdataset (a lent machine that receives only the working tree):
#   launch/gpu_check.sh prepare [TRAIN_PER_CLASS VALID_PER_CLASS]   # here: .gpucheck/ (git-ignored)
#   launch/gpu_check.sh run [bench gpu options]                     # there, in the repository root
# prepare copies ../shared/wheels/*.whl and the first 3000 + 750 images per class of the PCam
# sample (about 52 MB: 7 KB per image; the whole sample, 157 MB, exceeds a 64 MiB transfer).
# run installs the wheels into /tmp/site, then runs the check on .gpucheck/data (else on
# ../shared/data/pcam-jpeg) and writes gpu.json into $OUT (else bench-results/).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  n_train=${2:-3000} n_valid=${3:-750} src=${SRC:-../shared/data/pcam-jpeg}
  rm -rf .gpucheck && mkdir -p .gpucheck/wheels
  cp ../shared/wheels/*.whl .gpucheck/wheels/
  for split in train valid; do
    n=$n_train && [[ $split == valid ]] && n=$n_valid
    for cls in 0 1; do
      mkdir -p ".gpucheck/data/$split/$cls"
      find "$src/$split/$cls" -name '*.jpg' | sort | awk -v n="$n" 'NR <= n' | xargs cp -t ".gpucheck/data/$split/$cls/"
    done
  done
  du -sh .gpucheck
  ;;
run)
  shift
  if compgen -G ".gpucheck/wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .gpucheck/wheels/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 WANDB_MODE=disabled
  data=.gpucheck/data && [[ -d $data ]] || data=../shared/data/pcam-jpeg
  python3 -m histodist.bench gpu --data "$data" --json "${OUT:-bench-results}/gpu.json" "$@"
  ;;
*)
  echo "usage: $0 prepare [TRAIN_PER_CLASS VALID_PER_CLASS] | run [bench gpu options]" >&2
  exit 2
  ;;
esac
