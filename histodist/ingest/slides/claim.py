"""Which task of a cluster run writes the manifest: the first to find every shard finished, once.

Slurm array tasks start and end in any order, several may end at the same moment, and a task
may be requeued and run again after the manifest is written. Each task, once its own shards
are written, looks at everybody's (sharding.gather); every task that finds them all finished
would write the manifest. So the decision is taken under an exclusive lock on
`OUT/.shardinfo/manifest.lock`, whose content names the plan the manifest on disk describes
(`plan_digest`: every shard's name and fingerprint, the dataset name, source, seed and tiling
options):
- at start, a task removes manifest.json and _info.json unless they describe its own plan (an
  interrupted run of another plan must not look complete; a requeued task of a finished run
  leaves its manifest in place for the readers);
- at the end, the task that finds every shard finished and no manifest of its plan writes it,
  then records the plan; one that takes the lock after it finds the manifest written.
The lock is a POSIX record lock (`fcntl.lockf`, as histodist.training.runlock): the kernel
drops it when its process ends however it ends (a requeue's kill included), and it holds
across the nodes of an NFS mount. On a file system without locks a warning says so and tasks
fall back to the unlocked check (a manifest then may be written twice, identically).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

from histodist.errors import warn
from histodist.ingest.writer import INFO_DIR, ShardTask

LOCK_NAME = "manifest.lock"
MANIFEST_FILES = ("manifest.json", "_info.json")


def plan_digest(tasks: Sequence[ShardTask], settings: dict) -> str:
    """sha256 of what the manifest describes: the shards (names, fingerprints) and `settings`
    (JSON-able: name, source, seed, tiling record...); the same on every task of a run."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for t in tasks:
        h.update(f"\n{t.name}|{t.fingerprint()}".encode())
    return h.hexdigest()


class Ledger:
    """The lock file's content while the lock is held: which plan the manifest describes."""

    def __init__(self, out: Path, fh) -> None:
        self.out, self._fh = out, fh
        try:
            fh.seek(0)
            self.plan = json.loads(fh.read() or "{}").get("plan")
        except ValueError:  # a half-written ledger (a crash while recording): no plan
            self.plan = None

    def current(self, plan: str) -> bool:
        """The manifest on disk describes `plan` (every shard of it was finished then)."""
        return self.plan == plan and all((self.out / n).is_file() for n in MANIFEST_FILES)

    def clear_stale(self, plan: str) -> None:
        """Remove manifest.json and _info.json unless they describe `plan`."""
        if not self.current(plan):
            for name in MANIFEST_FILES:
                (self.out / name).unlink(missing_ok=True)

    def record(self, plan: str, who: str) -> None:
        """Note that the manifest just written describes `plan` (written by `who`)."""
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(json.dumps({"plan": plan, "written_by": who}) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.plan = plan


@contextlib.contextmanager
def manifest_lock(out: str | os.PathLike) -> Iterator[Ledger]:
    """Hold the output folder's manifest lock (waiting for another task's turn); yield its
    ledger. Keep the block short: every task of the run waits on it."""
    out = Path(out)
    path = out / INFO_DIR / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        locked = _lock(fh, path)
        try:
            yield Ledger(out, fh)
        finally:
            if locked:
                fcntl.lockf(fh, fcntl.LOCK_UN)


def _lock(fh, path: Path) -> bool:
    try:
        fcntl.lockf(fh, fcntl.LOCK_EX)  # blocks while another task holds it (seconds)
    except OSError as e:
        if e.errno == errno.EINTR:
            raise
        warn(
            f"{path}: cannot lock ({e.strerror}); this file system has no locks, so tasks "
            "ending together may each write the manifest"
        )
        return False
    return True


def holder() -> str:
    """This task, for the ledger: Slurm array task or job id, host, pid."""
    env = os.environ
    job = env.get("SLURM_ARRAY_JOB_ID")
    job = f"{job}_{env['SLURM_ARRAY_TASK_ID']}" if job else env.get("SLURM_JOB_ID")
    where = f"pid {os.getpid()} on {socket.gethostname()}"
    return f"job {job}, {where}" if job else where
