"""Timing and reporting helpers shared by the benchmark suites.

The machines are noisy (shared cores, other jobs), so a figure is the median of several
repeats with warm-up excluded, and comparisons are ratios of figures measured in the same run.
CUDA work is asynchronous: every timed interval ends with `sync(device)`.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

MB = 1024 * 1024


def sync(device: torch.device | str) -> None:
    """Wait for queued CUDA kernels, so that a timer reads finished work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def measure_steps(
    step: Callable[[], tuple[int, float]],
    *,
    device: torch.device | str,
    warmup: int,
    repeats: int,
    steps: int,
) -> dict[str, Any]:
    """Throughput of `step` (which returns (images, seconds spent waiting for data)).

    `warmup` steps are run untimed (worker start-up, buffer fill, cuDNN autotuning), then
    `repeats` windows of `steps` steps; images/s is the median over the windows and the
    per-step split (data wait vs the rest: transfer, augmentation, forward, backward, optimizer)
    the median over all timed steps. The device is synchronised after every step.
    """
    for _ in range(warmup):
        step()
        sync(device)
    rates, waits, totals = [], [], []
    for _ in range(repeats):
        images, t_window = 0, time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            n, wait = step()
            sync(device)
            totals.append(time.perf_counter() - t0)
            waits.append(wait)
            images += n
        rates.append(images / (time.perf_counter() - t_window))
    step_s, wait_s = median(totals), median(waits)
    return {
        "images_per_s": round(median(rates), 2),
        "images_per_s_repeats": [round(r, 2) for r in rates],
        "step_ms": round(1e3 * step_s, 2),
        "data_wait_ms": round(1e3 * wait_s, 2),
        "compute_ms": round(1e3 * (step_s - wait_s), 2),
        "data_wait_fraction": round(sum(waits) / max(sum(totals), 1e-12), 4),
        "timed_steps": repeats * steps,
    }


class PeakMemory:
    """Peak resident memory of this process and of each child process (DataLoader workers),
    sampled with psutil every `interval` seconds in a background thread, and peak device
    memory (torch.cuda.max_memory_allocated) on CUDA. Use as a context manager.

    Worker RSS counts pages shared copy-on-write with the parent, so it overstates what a
    worker adds; it is what the OOM killer and `top` see.
    """

    def __init__(self, device: torch.device | str, interval: float = 0.2):
        import psutil

        self.device, self.interval = torch.device(device), interval
        self.proc = psutil.Process()
        self.main_peak, self.child_peak = 0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        self.main_peak = max(self.main_peak, self.proc.memory_info().rss)
        for child in self.proc.children(recursive=True):
            try:
                rss = child.memory_info().rss
            except psutil.Error:  # the worker exited between listing and reading
                continue
            self.child_peak[child.pid] = max(self.child_peak.get(child.pid, 0), rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def result(self) -> dict[str, Any]:
        out = {
            "main_rss_mb": round(self.main_peak / MB, 1),
            "worker_rss_mb": round(max(self.child_peak.values(), default=0) / MB, 1),
            "workers_seen": len(self.child_peak),
        }
        if self.device.type == "cuda":
            out["device_peak_mb"] = round(torch.cuda.max_memory_allocated(self.device) / MB, 1)
        return out


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: CPUs, load, library versions, the GPU if any."""
    from histodist.version import version_string

    info = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "histodist": version_string(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write obj as indented JSON through a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}"
    return str(v)


def table(rows: list[dict], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """A Markdown table of `columns` of each row (missing values print as '-')."""
    headers = list(headers or columns)
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

    def line(xs: list[str]) -> str:
        return "| " + " | ".join(x.ljust(w) for x, w in zip(xs, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(c) for c in cells)])
