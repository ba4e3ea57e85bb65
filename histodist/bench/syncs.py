"""Count the operations that make the host wait for the device (host synchronisations).

A GPU runs ahead of Python only while the loop never waits for it; each `.item()`, `bool(t)`,
`.tolist()`, `.cpu()`, `nonzero()` or blocking copy of host data to the device stalls the queue.
On CUDA, `torch.cuda.set_sync_debug_mode` reports the synchronising calls themselves; on a CPU
nothing synchronises, so `SyncCounter` intercepts the Python-level operations that would (a
torch function mode, so it sees every torch call made while it is active):

    with SyncCounter() as c:
        c.bucket = "step 1"
        train_step()
    c.counts   # {"step 1": 0}

Only calls made while `bucket` is not None are counted (set it to None around the data
loader, whose decoding happens on the host by design).
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

# Tensor -> host value: on a GPU each waits for every queued kernel.
READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}
# Output size depends on the data: the host waits to learn it.
DATA_DEPENDENT = {"nonzero", "argwhere", "masked_select", "unique", "nonzero_static"}
# Host data made into a tensor inside the loop: on a GPU a blocking host-to-device copy.
FROM_HOST = {"tensor", "as_tensor", "from_numpy"}


def _name(func) -> str:
    return getattr(func, "__name__", str(func))


def _blocking_copy(name: str, args: tuple, kwargs: dict) -> bool:
    """`.to(device)` / `.copy_(src)` moving a non-pinned CPU tensor to another device without
    non_blocking (never true on a CPU-only run: there is no other device)."""
    if name not in ("to", "copy_") or not args or kwargs.get("non_blocking"):
        return False
    if name == "copy_":
        dst, src = args[0], args[1] if len(args) > 1 else kwargs.get("src")
    else:
        src, dst = args[0], next((a for a in args[1:] if isinstance(a, str | torch.device)),
                                 kwargs.get("device"))  # fmt: skip
        dst = torch.empty(0, device=dst) if dst is not None else None
    if not isinstance(src, torch.Tensor) or not isinstance(dst, torch.Tensor):
        return False
    return src.device.type == "cpu" and dst.device.type != "cpu" and not src.is_pinned()


class SyncCounter(TorchFunctionMode):
    """Counts would-be host synchronisations per `bucket` (any hashable; None = not counted).
    `events` lists (bucket, operation name) in order, to say what synchronised."""

    def __init__(self) -> None:
        super().__init__()
        self.bucket = None
        self.counts: Counter = Counter()
        self.events: list[tuple] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.bucket is not None and self._syncs(func, args, kwargs):
            self.counts[self.bucket] += 1
            self.events.append((self.bucket, _name(func)))
        return func(*args, **kwargs)

    @staticmethod
    def _syncs(func, args: tuple, kwargs: dict) -> bool:
        name = _name(func)
        if name in READS or name in DATA_DEPENDENT or name in FROM_HOST:
            return True
        return _blocking_copy(name, args, kwargs)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing counted inside (e.g. the data loader's next batch)."""
        bucket, self.bucket = self.bucket, None
        try:
            yield
        finally:
            self.bucket = bucket


@contextlib.contextmanager
def cuda_sync_warnings(device: torch.device) -> Iterator[list]:
    """On CUDA, the synchronising calls made inside, as reported by
    torch.cuda.set_sync_debug_mode("warn") (a list of warning messages, filled on exit);
    on other devices an empty list."""
    found: list[str] = []
    if torch.device(device).type != "cuda":
        yield found
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    found.extend(str(w.message) for w in caught if "synchroniz" in str(w.message).lower())
