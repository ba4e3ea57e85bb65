"""Helpers shared by the training tests: tiny real-image shards and CLI invocations."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from shardkit import pcam_images, write_shards

ROOT = Path(__file__).resolve().parent.parent

# small-cnn at 32 px, 8 steps of 8 images per epoch on one process: a few seconds per epoch.
TINY = [
    "--model",
    "small-cnn",
    "--image-size",
    "32",
    "--batch-size",
    "8",
    "--workers",
    "0",
    "--log-every",
    "1",
    "--no-progress",
    "--lr",
    "0.003",
    "--warmup-epochs",
    "0.25",
]


def run_flags(shards, runs_dir, name: str, wandb: str = "disabled") -> list[str]:
    """Flags of a tiny test run: its shards, run folder and W&B mode, then TINY."""
    return ["--shards", str(shards), "--runs-dir", str(runs_dir), "--run-name", name,
            "--wandb", wandb, *TINY]  # fmt: skip


def tiny_shards(
    out: Path, pcam_jpeg: Path, *, train_per_class: int = 32, valid_per_class: int = 20
) -> Path:
    """64 real PCam train patches in 4 shards of 16, 40 valid patches in shards of 16, 16, 8."""
    images = {
        "train": pcam_images(pcam_jpeg, "train", train_per_class),
        "valid": pcam_images(pcam_jpeg, "valid", valid_per_class),
    }
    write_shards(out, images, 16)
    return out


def subprocess_env(**extra: str) -> dict:
    """os.environ with one compute thread per process (the cores are shared by every process
    of a test), then `extra`."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def accelerate_cpu_env(**extra: str) -> dict:
    """The environment of an `accelerate launch --multi_gpu` of CPU processes (gloo)."""
    return subprocess_env(ACCELERATE_USE_CPU="true", **extra)


def env(wandb_dir: Path | None = None, **extra: str) -> dict:
    """The environment of a training subprocess: offline hub and W&B, tests/ importable."""
    e = subprocess_env(**extra)
    e.update(
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        # This checkout's package first, also for scripts run by path (sys.path[0] is theirs).
        PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
    )
    if wandb_dir is not None:
        e["WANDB_DIR"] = str(wandb_dir)
    return e


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "histodist.train", *args]


def run(args: list[str], *, wandb_dir: Path | None = None, timeout: int = 560, **extra: str):
    return subprocess.run(
        args, cwd=ROOT, env=env(wandb_dir, **extra), capture_output=True, text=True, timeout=timeout
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a rendezvous, or a refused
    connection)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAULTY_TRAIN = ROOT / "tests" / "scripts" / "faulty_train.py"


def launch_cmd(*args: str, processes: int = 2) -> list[str]:
    """`accelerate launch` of `processes` CPU processes (gloo) running `args` (a script and its
    flags, or "-m", module, flags); needs accelerate_cpu_env (ACCELERATE_USE_CPU)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(processes), "--num_machines", "1",
            "--main_process_port", str(free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no", *args]  # fmt: skip


def processes_with(marker: str) -> list[str]:
    """Command lines of the live processes (not zombies) whose command line holds `marker`
    (e.g. a test's run folder: trainers and their forked DataLoader workers name it)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # gone, or not a process folder
        if marker in cmd and state != "Z" and proc.name != str(os.getpid()):
            found.append(f"{proc.name}: {cmd[:200]}")
    return found


def bounded_run(args: list[str], marker: str, *, timeout: float, **extra: str):
    """Run `args` (env() plus `extra`) in a session of its own and return (completed process,
    seconds it took, processes naming `marker` still alive 10 s after it ended). A run past
    `timeout` (a hang) is killed with every process naming `marker` and fails the test."""
    import signal
    import time

    import pytest

    t0 = time.monotonic()
    proc = subprocess.Popen(args, cwd=ROOT, env=env(**extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        left = processes_with(marker)
        os.killpg(proc.pid, signal.SIGKILL)
        for line in left:
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"no exit within {timeout} s (a hang); alive: {left}\n{err[-3000:]}")
    seconds = time.monotonic() - t0
    deadline = time.monotonic() + 10
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    done = subprocess.CompletedProcess(args, proc.returncode, out, err)
    return done, seconds, processes_with(marker)
