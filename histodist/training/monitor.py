"""What limits a training run, per log window: time spent waiting for data, and peak memory.

Both are read at log time only (the loss is read there anyway), so no training step waits for
the device to measure them:

- `train/data_wait`: the share (0..1) of the window's wall time the loop spent blocked in the
  train loader's `next()`. A run near 0 is compute-bound; a run near 1 starves for data (add
  `--workers`, cache remote shards, or use a cheaper encoding).
- `train/peak_rss_gib`: peak resident memory of the training process (the one that runs the
  model, not its loader workers) during the window, in GiB: Linux's VmHWM, reset at each log
  line through /proc/self/clear_refs. Where that file cannot be written (not Linux), the
  process's peak since it started (getrusage).
- `train/peak_gpu_mem_gib` (CUDA only): `torch.cuda.max_memory_allocated` during the window,
  in GiB (tensors torch allocated, without the caching allocator's reserve), reset per window.

With several processes each figure is the maximum over ranks: one starving or full rank slows
every rank through DDP's all-reduce.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

GIB = 2.0**30
DATA_WAIT = "train/data_wait"
PEAK_RSS = "train/peak_rss_gib"
PEAK_GPU = "train/peak_gpu_mem_gib"


def _linux_hwm_kib() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmHWM:\s+(\d+)\s+kB", status, re.MULTILINE)
    return int(m.group(1)) if m else None


def _reset_linux_hwm() -> bool:
    """Reset VmHWM to the current resident size (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since the last reset (Linux) or since it started."""
    kib = _linux_hwm_kib()
    if kib is not None:
        return kib * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


class Monitor:
    """Data wait and peak memory of the current log window (one per run, on every rank)."""

    def __init__(self) -> None:
        self.wait = 0.0  # seconds blocked in the train loader since the window began

    def batches(self, loader: Iterable, device: torch.device) -> Iterator[Any]:
        """`loader`'s batches, timing each `next()`; starts a new window (an epoch's first)."""
        self.restart(device)
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t0
            yield batch

    def restart(self, device: torch.device) -> None:
        """Zero the wait and reset the memory peaks (and CUDA's on `device`)."""
        self.wait = 0.0
        _reset_linux_hwm()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def window(self, accelerator, seconds: float) -> dict[str, float]:
        """The figures of the window that lasted `seconds` (max over ranks), then restart.
        Collective when there are several processes (one small all-reduce)."""
        device = accelerator.device
        figures = {DATA_WAIT: min(1.0, self.wait / max(seconds, 1e-9)),
                   PEAK_RSS: peak_rss_bytes() / GIB}  # fmt: skip
        if device.type == "cuda":
            figures[PEAK_GPU] = torch.cuda.max_memory_allocated(device) / GIB
        if accelerator.num_processes > 1:
            worst = accelerator.reduce(torch.tensor(list(figures.values()), device=device), "max")
            figures = dict(zip(figures, worst.tolist(), strict=True))
        self.restart(device)
        return figures
