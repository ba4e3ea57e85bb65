"""Deterministic fault injection for the checkpoint protocol.

`FaultPlan(k)` counts every file-system operation a checkpoint makes (renames, symlinks,
removals, copies, fsyncs, and the writes of accelerate's save_state and of safetensors) and
fails the k-th: by raising `Killed` (a BaseException, so no `except Exception` cleanup runs:
the folder is left as a SIGKILL would leave it) or, with `exit_code`, by os._exit (a real kill
of a training subprocess). `install_from_env()` arms it in a subprocess from HISTODIST_FAULT_AT.
`Payload` / `live_payload` give the pickle that checks a loader never unpickles a file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

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
    """Fail the k-th operation (1-based), or the k-th of the operations named `op` (e.g. the
    5th os.replace); k=0 only counts. `log` lists (op, first argument)."""

    def __init__(self, k: int = 0, exit_code: int | None = None, op: str | None = None):
        self.k, self.exit_code, self.op = k, exit_code, op
        self.n, self.hits, self.log = 0, 0, []
        self._saved: list = []

    def _wrap(self, name: str, fn):
        def wrapper(*args, **kwargs):
            self.n += 1
            self.hits += self.op in (None, name)
            self.log.append((name, str(args[0]) if args else ""))
            if self.op in (None, name) and self.hits == self.k:
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
    """Arm a plan that kills the process (exit 137) at HISTODIST_FAULT_AT ("replace:5": the
    5th os.replace; "7": the 7th operation of any kind), counting only operations made while
    a checkpoint is saved (histodist.training.checkpoint.save_last)."""
    spec = os.environ.get("HISTODIST_FAULT_AT", "")
    if not spec:
        return None
    from histodist.training import checkpoint

    op, _, k = spec.rpartition(":")
    plan = FaultPlan(int(k), exit_code=137, op=op or None)
    original = checkpoint.save_last

    def save_last(*args, **kwargs):
        with plan:
            return original(*args, **kwargs)

    checkpoint.save_last = save_last
    return plan


class Payload:
    """Pickles to a call that creates a marker file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def live_payload(tmp_path: Path) -> Path:
    """The marker path a Payload creates, after checking (with a probe file) that unpickling
    a Payload really creates it; the marker does not exist on return."""
    marker = tmp_path / "marker"
    torch.save(Payload(marker), tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert marker.exists()  # the payload is live when unpickled
    marker.unlink()
    return marker
