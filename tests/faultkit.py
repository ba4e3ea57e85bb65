"""Deterministic fault injection for the checkpoint protocol.

`FaultPlan(k)` counts every file-system operation a checkpoint makes (renames, symlinks,
removals, copies, fsyncs, and the writes of accelerate's save_state and of safetensors) and
fails the k-th: by raising `Killed` (a BaseException, so no `except Exception` cleanup runs:
the folder is left as a SIGKILL would leave it) or, with `exit_code`, by os._exit (a real kill
of a training subprocess). `install_from_env()` arms it in a subprocess from HISTODIST_FAULT_AT.
"""

from __future__ import annotations

import os
import shutil

import accelerate.utils.other as acc_other
import torch

OPS = [
    (os, "replace"),
    (os, "rename"),
    (os, "symlink"),
    (os, "unlink"),
    (os, "fsync"),
    (shutil, "rmtree"),
    (shutil, "copytree"),
    (torch, "save"),
    (acc_other, "safe_save_file"),
]


class Killed(BaseException):
    """The injected failure."""


class FaultPlan:
    """Fail the k-th operation (1-based); k=0 only counts. `log` lists (op, first argument)."""

    def __init__(self, k: int = 0, exit_code: int | None = None):
        self.k, self.exit_code, self.n, self.log = k, exit_code, 0, []
        self._saved: list = []

    def _wrap(self, name: str, fn):
        def wrapper(*args, **kwargs):
            self.n += 1
            self.log.append((name, str(args[0]) if args else ""))
            if self.n == self.k:
                if self.exit_code is not None:
                    os._exit(self.exit_code)
                raise Killed(f"{name} #{self.n}")
            return fn(*args, **kwargs)

        return wrapper

    def __enter__(self) -> FaultPlan:
        for mod, name in OPS:
            fn = getattr(mod, name)
            self._saved.append((mod, name, fn))
            setattr(mod, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc) -> None:
        for mod, name, fn in reversed(self._saved):
            setattr(mod, name, fn)
        self._saved.clear()


def install_from_env() -> FaultPlan | None:
    """Arm a plan that kills the process (exit 137) at op HISTODIST_FAULT_AT, counting only
    operations made while a checkpoint is saved (histodist.checkpoint.save_last)."""
    k = int(os.environ.get("HISTODIST_FAULT_AT", "0"))
    if not k:
        return None
    from histodist import checkpoint

    plan = FaultPlan(k, exit_code=137)
    original = checkpoint.save_last

    def save_last(*args, **kwargs):
        with plan:
            return original(*args, **kwargs)

    checkpoint.save_last = save_last
    return plan
