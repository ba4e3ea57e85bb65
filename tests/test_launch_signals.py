"""SIGTERM to the process a launch script started reaches the trainer (docker stop, Kubernetes
and `kill` signal that one process, not its process group), on tiny real PCam shards: one
process, two processes through launch/single_node.sh, and `accelerate launch` itself."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainkit import (
    FAULTY_TRAIN,
    ROOT,
    env,
    free_port,
    launch_cmd,
    processes_with,
    run_flags,
    tiny_shards,
)

from histodist.training.distributed import Preemption

pytestmark = pytest.mark.slow


def test_single_gpu_launcher_sigterm_saves_a_checkpoint_and_exits_0(tmp_path, pcam_jpeg):
    shards = tiny_shards(tmp_path / "shards", pcam_jpeg)
    e = env(MIXED_PRECISION="no", RUN_NAME="one")
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e['PATH']}"
    proc = subprocess.Popen(
        ["bash", str(ROOT / "launch" / "single_gpu.sh"),
         *run_flags(shards, tmp_path, "one"), "--epochs", "50"],
        cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # a group of its own, to clean up after a failure
    )  # fmt: skip
    metrics = tmp_path / "one" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and sum(1 for _ in metrics.open()) >= 2:
            os.kill(proc.pid, signal.SIGTERM)  # the launcher's pid only, not its group
            break
        time.sleep(0.05)
    try:
        log, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # e.g. a trainer left running by its launcher
        pytest.fail("the launcher did not stop the trainer within 120 s of SIGTERM")
    assert proc.returncode == 0, log[-3000:]
    assert "SIGTERM: saved" in log, log[-3000:]
    meta = json.loads((tmp_path / "one" / "checkpoints" / "last" / "meta.json").read_text())
    assert 0 < meta["step"] < 50 * 8


def _signal_when(proc: subprocess.Popen, line: str, sig: int, target: int, after: float = 0) -> str:
    """Read `proc`'s output until a line holding `line`, then `after` seconds later send `sig`
    to pid `target`; returns everything read up to the end of the process."""
    out = []
    for text in proc.stdout:
        out.append(text)
        if line in text:
            time.sleep(after)
            os.kill(target, sig)
            break
    rest, _ = proc.communicate(timeout=300)
    return "".join(out) + rest


def _saved_steps(log: str) -> dict[int, int]:
    found = re.findall(r"\[rank (\d)\] checkpoint saved at step (\d+)", log)
    return {int(rank): int(step) for rank, step in found}


def test_sigterm_to_the_launch_script_of_two_processes_with_slow_steps(tmp_path, tiny_pcam_shards):
    """`kill <pid>` of launch/single_node.sh (2 CPU processes), steps of ~2 s and --log-every
    1000: the script passes the signal to the training processes, they agree on it within
    Preemption.INTERVAL_S (not at the end of the 16-step epoch), save, and every process
    exits 0."""
    shards = tiny_pcam_shards
    flags = [*run_flags(shards, tmp_path, "two"), "--batch-size", "2", "--log-every", "1000",
             "--epochs", "3"]  # fmt: skip
    e = env(GPUS_PER_NODE="2", ACCELERATE_USE_CPU="true", MIXED_PRECISION="no",
            MAIN_PROCESS_PORT=str(free_port()), TRAIN_MODULE="faulty_train", SLOW_STEP_S="2",
            PYTHONUNBUFFERED="1")  # fmt: skip
    e["PYTHONPATH"] = f"{FAULTY_TRAIN.parent}{os.pathsep}{e['PYTHONPATH']}"
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e['PATH']}"
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "single_node.sh"), *flags], cwd=ROOT,
                            env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        # 3 s in: after the ranks' first agreement (step 1), inside the next interval.
        log = _signal_when(proc, "2 process(es) on", signal.SIGTERM, proc.pid, after=3)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the training processes did not stop within 300 s of SIGTERM")
    assert proc.returncode == 0, log[-4000:]
    assert "2 process(es)" in log and "SIGTERM: saved" in log, log[-4000:]
    saved = _saved_steps(log)
    print(f"saved at steps {saved} (16 steps per epoch, {Preemption.INTERVAL_S} s agreement)")
    assert sorted(saved) == [0, 1] and len(set(saved.values())) == 1, log[-4000:]
    assert saved[0] <= 8, log[-4000:]  # at most INTERVAL_S / 2 s steps after the signal
    meta = json.loads((tmp_path / "two" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["step"] == saved[0] and meta["world_size"] == 2
    assert not processes_with(str(tmp_path)), "a process of the run is still alive"


def test_sigterm_to_accelerate_launch_itself_saves_but_the_launcher_exits_1(
    tmp_path, tiny_pcam_shards
):
    """SIGTERM straight to `accelerate launch` (2 CPU processes): torch's elastic agent passes
    it to the ranks, which save and exit 0, then re-raises it (SignalException), so the
    launcher ends non-zero: 143 (128 + SIGTERM) where accelerate handles that exception, 1 with
    a traceback where it does not (docs/cluster.md). The launch scripts signal the ranks
    instead."""
    shards = tiny_pcam_shards
    cmd = launch_cmd("-m", "histodist.train", *run_flags(shards, tmp_path, "raw"),
                     "--epochs", "50")  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(ACCELERATE_USE_CPU="true",
                            PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        log = _signal_when(proc, "epoch 1/50 step", signal.SIGTERM, proc.pid)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the training processes did not stop within 300 s of SIGTERM")
    assert proc.returncode in (1, 128 + signal.SIGTERM), log[-4000:]
    assert "Received 15 death signal, shutting down workers" in log, log[-4000:]  # the agent
    saved = _saved_steps(log)
    assert sorted(saved) == [0, 1] and len(set(saved.values())) == 1, log[-4000:]
    assert not processes_with(str(tmp_path)), "a process of the run is still alive"
