"""SIGTERM to the process a launch script started reaches the trainer (docker stop, Kubernetes
and `kill` signal that one process, not its process group), on tiny real PCam shards."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainkit import ROOT, env, run_flags, tiny_shards

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
