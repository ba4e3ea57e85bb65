"""DataLoader worker processes of the shard loaders: which signals they ignore, and how they
always end.

Workers ignore SIGTERM and SIGUSR1: `timeout`, `docker stop`, Kubernetes, Slurm and torch
elastic signal a whole process group, and a worker killed by that signal would fail the
trainer before it checkpoints (the trainer's Preemption handler saves, then ends them).

That breaks what torch's DataLoader relies on when a process exits with an epoch still in
progress (an error raised while its iterator is alive): torch leaves such workers to
multiprocessing's exit handler, which sends SIGTERM to every daemonic child and then joins it,
so a worker that ignores the signal is joined forever and the process never exits after
printing its error. Hence:

- `stop(it)` ends an iterator's workers now: torch's own shutdown (a stop message on each
  index queue, a bounded join), then SIGKILL for any still alive (a worker blocked on a stalled
  read never sees the message). The loader calls it when an epoch ends early for any reason;
- `track(it)` registers an iterator whose workers the process stops at exit, before
  multiprocessing's handler runs (atexit runs its handlers last registered first).

Workers only read and decode shards: killing one loses nothing.
"""

from __future__ import annotations

import atexit
import signal
import threading
import weakref

import torch

_LIVE: weakref.WeakSet = weakref.WeakSet()  # DataLoader iterators whose workers may run
_LOCK = threading.Lock()
_registered = False


def init(_: int) -> None:
    """DataLoader worker_init_fn of the shard loaders: one compute thread, and SIGTERM /
    SIGUSR1 ignored (see the module docstring; SIGINT: torch's worker loop exits quietly)."""
    torch.set_num_threads(1)  # decoding is one image at a time; avoid oversubscribing the cores
    for name in ("SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def track(it) -> None:
    """Stop the workers of DataLoader iterator `it` at the latest when the process exits."""
    global _registered
    if not hasattr(it, "_shutdown_workers"):
        return  # no worker processes (workers=0)
    with _LOCK:
        if not _registered:
            # Registered after torch and multiprocessing registered theirs (at import), so
            # it runs before them: before torch turns its shutdown into a no-op, and before
            # multiprocessing joins the workers.
            atexit.register(_stop_all)
            _registered = True
        _LIVE.add(it)


def stop(it) -> None:
    """End the workers of DataLoader iterator `it` (idempotent; nothing without workers)."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is None:
        return
    # torch's own path (what the iterator's __del__ does): workers get a stop message and are
    # joined for up to 5 s each; a worker still alive then is sent SIGTERM, which ours ignore.
    shutdown()
    for w in getattr(it, "_workers", ()):
        if w.is_alive():
            w.kill()
            w.join(timeout=5)
    _LIVE.discard(it)


def _stop_all() -> None:
    for it in list(_LIVE):
        stop(it)
