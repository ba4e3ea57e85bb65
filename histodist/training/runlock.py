"""The exclusive lock on a run folder, held by the main process for the whole run.

Two trainings in one run folder would write the same checkpoints, metrics and config; the
second to start is refused with one line naming the holder (pid, host, start time). The lock
is a POSIX record lock (`fcntl.lockf`) on `<run>/.lock`: the kernel releases it when the
holding process ends however it ends (kill -9 included), so a stale lock never blocks a
restart, and it is never inherited by forked DataLoader workers (which may outlive a killed
trainer by a few seconds); it also holds across the nodes of an NFS mount. The file's content
(the holder's line) is for the message only; the file stays after the run.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import os
import socket
from pathlib import Path

from histodist.errors import UsageError

NAME = ".lock"


class RunFolderBusy(UsageError):
    """Another training run holds the run folder."""


class RunLock:
    """A held lock; `release()` ends it (closing the file would too)."""

    def __init__(self, fh, path: Path) -> None:
        self._fh, self.path = fh, path

    def release(self) -> None:
        if self._fh is not None:
            fcntl.lockf(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def acquire(run_dir: str | os.PathLike) -> tuple[RunLock | None, str | None]:
    """Lock `run_dir` (created if needed) for this process: (the lock, None), or (None, a
    warning) on a file system without locks. Raises RunFolderBusy when another process holds
    it. Call once per run and process: POSIX locks do not exclude their own process."""
    path = Path(run_dir) / NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")  # noqa: SIM115 - held open for the run; "a+": the holder's line stays
    try:
        fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        fh.seek(0)
        holder = fh.read().strip()
        fh.close()
        if e.errno not in (errno.EACCES, errno.EAGAIN):  # lockf's answers for "held"
            return None, (
                f"warning: {path}: cannot lock ({e.strerror}); this file system has no locks, "
                "so nothing stops a second run in this folder"
            )
        raise RunFolderBusy(
            f"{path.parent}: in use by another training run ({holder or 'holder unknown'}); "
            "wait for it to end, or pass --run-name NEW"
        ) from None
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
    fh.flush()
    return RunLock(fh, path), None
