"""histodist.shard's real `main()` with hooks that make cluster races and requeues happen on cue.

    PYTHONPATH=tests:. SHARD_MODULE=shard_probe sbatch launch/slurm/shard_wsi.sbatch ...
    python tests/shard_probe.py --dataset wsi ...      # same flags as histodist.shard

Run by tests/test_shard_wsi.py (Slurm array environment variables) and tests/test_slurm.py
(a real Slurm array). Environment:
- PROBE_BARRIER=DIR, PROBE_BARRIER_N=N: once it has written its shards, a task waits until N
  tasks have (one file each in DIR), so that they all look for the manifest at the same time;
- PROBE_LOG=FILE: every file renamed onto a `manifest.json` appends one line
  (`manifest <task>`) to FILE, so a test counts how often the manifest was written;
- PROBE_PAUSE_TASK=T, PROBE_PAUSE_MARK=FILE: in the first run of array task T
  (SLURM_RESTART_COUNT unset or 0), after its first slide part is written, create FILE and
  sleep until killed (a requeue or a kill then lands mid-tiling at a known point).
Tiling must run in this process (--workers 1) for the pause hook to apply.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from histodist import shard
from histodist.ingest.slides import sharding

TASK = os.environ.get("SLURM_ARRAY_TASK_ID", "-")


def _barrier(write_share):
    def wrapped(*args, **kwargs):
        records = write_share(*args, **kwargs)
        folder = Path(os.environ["PROBE_BARRIER"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"task-{TASK}-{os.getpid()}").touch()
        n = int(os.environ.get("PROBE_BARRIER_N", "2"))
        deadline = time.monotonic() + 120
        while len(list(folder.iterdir())) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return records

    return wrapped


def _logged(replace):
    def wrapped(src, dst, *args, **kwargs):
        replace(src, dst, *args, **kwargs)
        if Path(dst).name == "manifest.json":
            with open(os.environ["PROBE_LOG"], "a") as f:
                f.write(f"manifest {TASK}\n")

    return wrapped


def _pausing(write_part):
    def wrapped(job):
        out = write_part(job)
        Path(os.environ["PROBE_PAUSE_MARK"]).touch()
        time.sleep(600)  # killed here by the test's requeue or kill
        return out

    return wrapped


def main() -> int:
    if os.environ.get("PROBE_BARRIER"):
        sharding.write_share = _barrier(sharding.write_share)
    if os.environ.get("PROBE_LOG"):
        os.replace = _logged(os.replace)
    first_run = int(os.environ.get("SLURM_RESTART_COUNT") or 0) == 0
    if os.environ.get("PROBE_PAUSE_TASK") == TASK and first_run:
        sharding._write_part = _pausing(sharding._write_part)
    return shard.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
