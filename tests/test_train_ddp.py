"""Two CPU processes through a real `accelerate launch` (gloo): ranks agree on the weights,
every training sample is seen once per epoch across ranks, validation covers the whole split."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from trainkit import ROOT, env, free_port, run, run_flags, tiny_shards

pytestmark = pytest.mark.slow


def launch_probe(tmp_path, shards, out, run_name: str, *flags: str) -> list[str]:
    """`accelerate launch` of 2 CPU processes running tests/scripts/train_probe.py."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--main_process_port", str(free_port()),
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "tests" / "scripts" / "train_probe.py"), str(out),
        *run_flags(shards, tmp_path / "runs", run_name), *flags,
    ]  # fmt: skip


def test_two_processes(tmp_path, pcam_jpeg):
    shards = tiny_shards(tmp_path / "shards", pcam_jpeg)
    out = tmp_path / "probe"
    cmd = launch_probe(tmp_path, shards, out, "ddp", "--no-resample", "--epochs", "2")
    res = run(cmd, timeout=400, ACCELERATE_USE_CPU="true")
    assert res.returncode == 0, res.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    manifest = json.loads((shards / "manifest.json").read_text())
    n_train = manifest["splits"]["train"]["num_samples"]
    for epoch in ("0", "1"):
        keys = ranks[0]["keys"][epoch] + ranks[1]["keys"][epoch]
        assert len(keys) == n_train and len(set(keys)) == n_train  # each sample once
        assert not set(ranks[0]["keys"][epoch]) & set(ranks[1]["keys"][epoch])
    lines = [json.loads(x) for x in (tmp_path / "runs/ddp/metrics.jsonl").read_text().splitlines()]
    val = [x for x in lines if "val/num_samples" in x]
    # Valid shards of 16, 16, 8 give the ranks 24 and 16 samples: gathered with padding, trimmed.
    assert [x["val/num_samples"] for x in val] == [40, 40]
    assert (tmp_path / "runs/ddp/checkpoints/last/random_states_1.pkl").is_file()
    windows = [x for x in lines if "train/loss" in x]  # the figures' max over the two ranks
    assert windows and all(0 <= x["train/data_wait"] <= 1 for x in windows)
    assert all(0.05 < x["train/peak_rss_gib"] < 64 for x in windows)


def test_signal_on_one_rank_stops_every_rank_with_a_checkpoint(tmp_path, pcam_jpeg):
    """SIGUSR1 to rank 1 only: the ranks agree through an all-reduce, save and exit 0."""
    shards = tiny_shards(tmp_path / "shards", pcam_jpeg)
    out = tmp_path / "probe"
    cmd = launch_probe(tmp_path, shards, out, "sig", "--epochs", "50")
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env(ACCELERATE_USE_CPU="true"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = tmp_path / "runs" / "sig" / "metrics.jsonl"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if (out / "pid1").is_file() and metrics.is_file() and metrics.stat().st_size > 0:
            os.kill(int((out / "pid1").read_text()), signal.SIGUSR1)
            break
        time.sleep(0.05)
    log, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, log[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["reason"] for r in ranks] == ["preempted", "preempted"]
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    meta = json.loads((tmp_path / "runs/sig/checkpoints/last/meta.json").read_text())
    assert 0 < meta["step"] < 50 * 4 and meta["world_size"] == 2
    assert "preemption signal on another rank: saved" in log  # rank 0 never got the signal


def test_resume_follows_the_main_process_when_a_rank_sees_no_checkpoint(tmp_path, pcam_jpeg):
    """Rank 1 cannot see checkpoints/ (a stale view of the shared file system): it still
    resumes from the state rank 0 chose, instead of starting fresh beside a resuming rank 0."""
    shards = tiny_shards(tmp_path / "shards", pcam_jpeg)
    base = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
    ]  # fmt: skip
    flags = [*run_flags(shards, tmp_path / "runs", "stale"), "--epochs", "1"]
    first = [*base, "--main_process_port", str(free_port()), "-m", "histodist.train", *flags]
    res = run(first, timeout=400, ACCELERATE_USE_CPU="true")
    assert res.returncode == 0, res.stderr[-4000:]
    script = str(ROOT / "tests" / "scripts" / "stale_view.py")
    again = [*base, "--main_process_port", str(free_port()), script, *flags[:-1], "2",
             "--resume"]  # fmt: skip
    res = run(again, timeout=300, ACCELERATE_USE_CPU="true")
    assert res.returncode == 0, res.stderr[-4000:]
    log = res.stdout + res.stderr
    assert "resumed" in log and "epoch 2/2 step 8" in log, log[-3000:]
    meta = json.loads((tmp_path / "runs/stale/checkpoints/last/meta.json").read_text())
    assert meta["step"] == 8 and meta["epoch"] == 2
