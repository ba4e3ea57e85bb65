"""histodist.train with faults set by the environment, for tests that run it as a process (one,
or several under `accelerate launch`):

    FULL_DISK=NAME[:K]  the K-th file (default 1st) named NAME opened for writing fails like a
                        full disk: its first write raises OSError(ENOSPC), naming no file, as a
                        write(2) failure does (atomic writes open `.NAME.<random>.tmp`, which
                        counts as NAME); for NAME ending in .bin / .pt / .pkl torch.save raises
                        it (torch writes those through its own file writer)
    SLOW_STEP_S=S       every training micro-step sleeps S seconds first (slow steps)

    python tests/scripts/faulty_train.py <histodist.train flags>
"""

import builtins
import errno
import io
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # this checkout's package
from histodist import train  # noqa: E402


def full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


class FullFile:
    """A file whose writes fail as on a full disk."""

    def __init__(self, f):
        self._f = f

    def write(self, _data):
        raise full()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def full_disk(spec: str) -> None:
    name, _, k = spec.partition(":")
    k, seen = int(k or 1), [0]

    def hit(path) -> bool:
        base = os.path.basename(os.fspath(path)) if isinstance(path, str | os.PathLike) else ""
        if base == name or (base.startswith(f".{name}.") and base.endswith(".tmp")):
            seen[0] += 1
            return seen[0] == k
        return False

    if name.endswith((".bin", ".pt", ".pkl")):
        import torch

        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if hit(f):
                raise full()
            return real_save(obj, f, *args, **kwargs)

        torch.save = save
        return
    real_open = io.open

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return FullFile(f) if any(c in mode for c in "wax+") and hit(file) else f

    builtins.open = io.open = open_


def slow_steps(seconds: float) -> None:
    from histodist.training import loop

    real = loop.micro_step

    def micro_step(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    loop.micro_step = micro_step


if os.environ.get("FULL_DISK"):
    full_disk(os.environ["FULL_DISK"])
if os.environ.get("SLOW_STEP_S"):
    slow_steps(float(os.environ["SLOW_STEP_S"]))
sys.exit(train.main(sys.argv[1:]))
