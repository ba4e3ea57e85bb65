"""Process-level helpers: preemption signals, cross-rank agreement, decisions and gathers,
per-step seeds, determinism."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from histodist.errors import HistodistError

T = TypeVar("T")


class Preemption:
    """SIGTERM / SIGUSR1 set a flag instead of killing the process; the training loop checks it
    every optimizer step on one process. On several, the ranks agree on it (`agree`, one
    all-reduce, a host sync) so that all save and exit together: at every log line, and in
    between at least every INTERVAL_S seconds of training, so that a signal is acted on in
    bounded time however long a step takes (the launcher kills the ranks some 30 s after its
    SIGTERM). The steps between agreements are agreed at each one from the slowest rank's
    step time: with fast steps that is --log-every (no sync but the log line's), with steps
    slower than INTERVAL_S / --log-every it is fewer, down to one."""

    SIGNALS = ("SIGTERM", "SIGUSR1")
    INTERVAL_S = 5.0

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict = {}
        self.next_step = 1  # the first agreement measures the step time
        self._since: tuple[float, int] | None = None  # (time, step) of the last agreement

    def install(self) -> Preemption:
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame) -> None:
        self.received = signal.Signals(signum).name

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def agreed_if_due(self, accelerator, step: int, log_every: int) -> bool:
        """`agree` when the schedule says so after optimizer step `step` (the same on every
        rank: the schedule is itself agreed), else False without communicating."""
        return step >= self.next_step and self.agree(accelerator, step, log_every)

    def restart_clock(self, step: int) -> None:
        """Time steps from now (an epoch starts: validation time is not a step's)."""
        self._since = (time.monotonic(), step)

    def agree(self, accelerator, step: int, log_every: int) -> bool:
        """One all-reduce: whether any rank got a signal; also sets the next agreement step
        from the slowest rank's step time since the last agreement."""
        now = time.monotonic()
        per_step = 0.0
        if self._since is not None and step > self._since[1]:
            per_step = (now - self._since[0]) / (step - self._since[1])
        signalled, slowest = agree(accelerator, self.received is not None, per_step)
        gap = log_every if slowest <= 0 else int(self.INTERVAL_S / slowest)
        self.next_step = step + max(1, min(log_every, gap))
        self._since = (time.monotonic(), step)
        return bool(signalled)


class NonFinite:
    """Optimizer steps skipped for a NaN/inf loss, counted on the device so that the training
    loop never waits for it; `read()` (one host sync) at log time. int64 scalars on `device`."""

    def __init__(self, device: torch.device, start: int = 0) -> None:
        self.run = torch.full((), start, dtype=torch.int64, device=device)  # consecutive now
        self.worst = self.run.clone()  # longest run since the last read
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)  # since the last read

    def update(self, bad: torch.Tensor) -> None:
        """Count one optimizer step; `bad`: bool scalar on the device."""
        self.run = torch.where(bad, self.run + 1, 0)
        self.worst = torch.maximum(self.worst, self.run)
        self.skipped = self.skipped + bad

    def read(self) -> tuple[int, int, int]:
        """(longest run, current run, skipped) since the last read; starts a new interval."""
        worst, run, skipped = torch.stack([self.worst, self.run, self.skipped]).tolist()
        self.worst, self.skipped = self.run.clone(), torch.zeros_like(self.skipped)
        return worst, run, skipped


def agree(accelerator, *flags: float) -> list[float]:
    """Element-wise max of small per-rank numbers over all ranks (one all-reduce): every rank
    gets the same answer, so decisions such as "stop now" never split the ranks."""
    t = torch.tensor([float(f) for f in flags], device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="max")
    return t.tolist()


def broadcast(accelerator, obj: Any) -> Any:
    """The main process's `obj` (a small picklable value) on every rank: decisions about files
    are taken where they are written, never from another node's possibly stale view."""
    if accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj])[0]


def on_main(accelerator, fn: Callable[[], T]) -> T:
    """`fn()` run on the main process, its result on every rank (collective). An expected
    error raised there (a HistodistError, or an OSError such as a full disk) is raised on every
    rank, so that no rank is left waiting in a collective for a main process that has left."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except (HistodistError, OSError) as e:
            error = e
    result, error = broadcast(accelerator, (result, error))
    if error is not None:
        raise error
    return result


class PeerFailure(HistodistError):
    """A collective failed because another process of the run stopped (its own error says
    why) or cannot be reached."""


def peer_failure(exc: BaseException) -> PeerFailure | None:
    """The one-line error for a collective that failed on this rank because another rank left
    (gloo: "Connection closed by peer"; NCCL: a DistBackendError), or None when `exc` is not
    that or no process group of several ranks is running."""
    dist = torch.distributed
    if not (isinstance(exc, RuntimeError) and dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_world_size() < 2:
        return None
    text = str(exc).strip()
    lost = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    if not (isinstance(exc, getattr(dist, "DistError", ())) or any(s in text for s in lost)):
        return None
    first = text.splitlines()[0] if text else type(exc).__name__
    return PeerFailure(
        f"rank {dist.get_rank()}: another process of this run stopped or cannot be reached "
        f"(its own error is above or in its log), so this one stops too ({first[:200]})"
    )


def gather_varlen(accelerator, t: torch.Tensor) -> torch.Tensor:
    """All-gather tensors whose first dimension differs per rank; returns the concatenation over
    ranks in rank order (on every rank), without padding rows. Same dtype/device as `t`."""
    if accelerator.num_processes == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = accelerator.gather(n).tolist()
    padded = accelerator.pad_across_processes(t.contiguous(), dim=0)
    gathered = accelerator.gather(padded)
    width = padded.shape[0]
    return torch.cat([gathered[r * width : r * width + s] for r, s in enumerate(sizes)])


def step_seed(seed: int, step: int, rank: int) -> int:
    """A distinct 63-bit seed per (seed, micro-step, rank). Seeding per step (rather than carrying
    generator state) makes a resumed run draw exactly what the uninterrupted run drew."""
    return ((seed * 1_000_003 + step) * 65_537 + rank) % (2**63 - 1)


def set_determinism(deterministic: bool) -> None:
    """Deterministic kernels for reproducible runs; cuDNN autotuning otherwise."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def set_cpu_threads(requested: int, device: torch.device) -> int:
    """Threads for this process's torch ops. `accelerate launch` exports OMP_NUM_THREADS=1
    unless told otherwise, which halves CPU training speed on a 2-core machine; so on a
    CPU-only run, 0 (auto) means the cores this process may use, shared by the local
    processes (LOCAL_WORLD_SIZE). On GPUs auto leaves torch's setting alone. Returns the count."""
    if requested == 0 and device.type != "cpu":
        return torch.get_num_threads()
    if requested == 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        requested = max(1, (cores or 1) // max(1, local))
    torch.set_num_threads(requested)
    return requested
