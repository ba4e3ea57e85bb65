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

from histodist.fileio import atomic_write

MB = 1024 * 1024


def sync(device: torch.device | str) -> None:
    """Wait for queued CUDA kernels, so that a timer reads finished work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


Step = Callable[[], tuple[int, float]]  # one step -> (images, seconds spent waiting for data)


def time_window(step: Step, device: torch.device | str, steps: int) -> dict[str, Any]:
    """Run `steps` steps; images, wall seconds, and per-step totals and data waits (seconds).
    The device is synchronised after every step, so a step's time includes its kernels."""
    images, totals, waits, t_window = 0, [], [], time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        n, wait = step()
        sync(device)
        totals.append(time.perf_counter() - t0)
        waits.append(wait)
        images += n
    return {"images": images, "seconds": time.perf_counter() - t_window,
            "totals": totals, "waits": waits}  # fmt: skip


def summarize(windows: list[dict]) -> dict[str, Any]:
    """images/s: median over windows; the per-step split (data wait vs the rest: transfer,
    augmentation, forward, backward, optimizer): medians over all timed steps."""
    rates = [w["images"] / w["seconds"] for w in windows]
    totals = [t for w in windows for t in w["totals"]]
    waits = [t for w in windows for t in w["waits"]]
    step_s, wait_s = median(totals), median(waits)
    return {
        "images_per_s": round(median(rates), 2),
        "images_per_s_repeats": [round(r, 2) for r in rates],
        "step_ms": round(1e3 * step_s, 2),
        "data_wait_ms": round(1e3 * wait_s, 2),
        "compute_ms": round(1e3 * (step_s - wait_s), 2),
        "data_wait_fraction": round(sum(waits) / max(sum(totals), 1e-12), 4),
        "timed_steps": len(totals),
    }


def measure_steps(
    step: Step, *, device: torch.device | str, warmup: int, repeats: int, steps: int
) -> dict[str, Any]:
    """Throughput of one `step`: `warmup` untimed steps (worker start-up, buffer fill, cuDNN
    autotuning), then `repeats` windows of `steps` steps (see summarize)."""
    return measure_interleaved(
        {"_": step}, device=device, warmup=warmup, repeats=repeats, steps=steps
    )["_"]


def measure_interleaved(
    configs: dict[str, Step],
    *,
    device: torch.device | str,
    warmup: int,
    repeats: int,
    steps: int,
    memory: PeakMemory | None = None,
) -> dict[str, dict[str, Any]]:
    """Several configurations measured side by side: each is warmed up, then the repeats are
    interleaved (a, b, c, a, b, c, ...), so that a change of load on a shared machine hits
    every configuration alike. With `memory`, its peaks are attributed per configuration."""
    windows: dict[str, list] = {name: [] for name in configs}
    for name, step in configs.items():
        if memory is not None:
            memory.switch(name)
        for _ in range(warmup):
            step()
            sync(device)
    for _ in range(repeats):
        for name, step in configs.items():
            if memory is not None:
                memory.switch(name)
            windows[name].append(time_window(step, device, steps))
    out = {name: summarize(w) for name, w in windows.items()}
    if memory is not None:
        memory.switch(None)
        for name in out:
            out[name].update(memory.result(name))
    return out


class PeakMemory:
    """Peak resident memory of this process and of its child processes (DataLoader workers),
    sampled with psutil every `interval` seconds in a background thread, and peak device
    memory (torch.cuda.max_memory_allocated) on CUDA, per label: `switch(label)` says which
    configuration runs now; a child belongs to the label under which it was first seen (loader
    workers start inside their own configuration's step). Use as a context manager.

    Worker RSS counts pages shared copy-on-write with the parent, so it overstates what a
    worker adds; it is what the OOM killer and `top` see.
    """

    def __init__(self, device: torch.device | str, interval: float = 0.2):
        import psutil

        self.device, self.interval = torch.device(device), interval
        self.proc = psutil.Process()
        self.label: str | None = None
        self.main_peak: dict = {}  # label -> bytes
        self.device_peak: dict = {}  # label -> bytes
        self.child_label: dict[int, str | None] = {}
        self.child_peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        label = self.label
        self.main_peak[label] = max(self.main_peak.get(label, 0), self.proc.memory_info().rss)
        for child in self.proc.children(recursive=True):
            try:
                rss = child.memory_info().rss
            except psutil.Error:  # the worker exited between listing and reading
                continue
            self.child_label.setdefault(child.pid, label)
            self.child_peak[child.pid] = max(self.child_peak.get(child.pid, 0), rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def switch(self, label: str | None) -> None:
        """Close the current label's device-memory window and start `label`'s."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            self.device_peak[self.label] = max(self.device_peak.get(self.label, 0), peak)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sample()
        self.label = label

    def __enter__(self) -> PeakMemory:
        self.switch(self.label)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.switch(None)

    def result(self, label: str | None = None) -> dict[str, Any]:
        """Peaks in MB of `label` (all labels when None)."""
        pick = lambda d: [v for k, v in d.items() if label is None or k == label]  # noqa: E731
        kids = [self.child_peak[p] for p, lab in self.child_label.items()
                if label is None or lab == label]  # fmt: skip
        out = {
            "main_rss_mb": round(max(pick(self.main_peak), default=0) / MB, 1),
            "worker_rss_mb": round(max(kids, default=0) / MB, 1),
            "workers_seen": len(kids),
        }
        if self.device.type == "cuda":
            out["device_peak_mb"] = round(max(pick(self.device_peak), default=0) / MB, 1)
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
    return atomic_write(path, json.dumps(obj, indent=1, default=str) + "\n")


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
