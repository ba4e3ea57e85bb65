"""launch/slurm/train.sbatch on a real one-node Slurm (tests/slurmkit.py), CPU only.

Two training processes on one node (GPUS_PER_NODE=2, ACCELERATE_USE_CPU=true, no GPU gres)
train on tiny real PCam shards. Once training runs, the job's time limit is cut to the next
whole minute plus one, so Slurm's own time-limit warning (--signal=B:USR1@115) is due at once
and reaches the batch script at slurmctld's next check. The first run pauses after each step
(tests/slurm_probe.py) so that the warning lands mid-training on any machine. Checked: the
warning arrives, both ranks save checkpoints/last, the job requeues itself, and the requeued
job resumes the same run and ends at the step count of an uninterrupted run. Skipped, with
the reason, where Slurm cannot start (not root, packages missing).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import pytest
from slurmkit import SlurmUnavailable, local_slurm
from trainkit import ROOT, env, free_port, run_flags, tiny_shards

pytestmark = pytest.mark.slow

EPOCHS = 12  # 4 steps of 2 x 8 images per epoch
PAUSE = "1.5"  # s after each step of the first run: 72 s, over twice slurmctld's check period


@pytest.fixture(scope="module")
def slurm_cluster():
    try:
        with local_slurm() as slurm:
            yield slurm
    except SlurmUnavailable as e:
        print(f"skipping the real-Slurm tests: {e}")
        pytest.skip(str(e))


def job_env(tmp_path: Path) -> dict:
    e = env(
        GPUS_PER_NODE="2",
        ACCELERATE_USE_CPU="true",
        MIXED_PRECISION="no",
        MAIN_PROCESS_PORT=str(free_port()),
        RUN_NAME="slurm",
        TRAIN_MODULE="slurm_probe",
        PROBE_STEP_PAUSE=PAUSE,
        WANDB_DIR=str(tmp_path),
    )
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e['PATH']}"  # this accelerate
    return e


def seconds(runtime: str) -> int:
    """Slurm's [D-]HH:MM:SS as seconds."""
    days, _, hms = runtime.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def train_lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if "train/loss" in x]


def uninterrupted_steps(shards: Path) -> int:
    from histodist.data.loader import train_loader

    n = len(train_loader(str(shards), "train", batch_size=8, rank=0, world_size=2, workers=0))
    return EPOCHS * math.ceil(n / 1)


def test_slurm_time_limit_checkpoints_every_rank_requeues_and_resumes(
    slurm_cluster, tmp_path, pcam_jpeg
):
    slurm = slurm_cluster
    shards = tiny_shards(tmp_path / "shards", pcam_jpeg)
    out, run_dir = tmp_path / "job.out", tmp_path / "runs" / "slurm"
    args = ["--job-name", "hd-slurm", "--nodes", "1", "--gpus-per-node", "0",
            "--cpus-per-task", str(os.cpu_count()), "--time", "10", "--signal", "B:USR1@115",
            "--output", str(out), str(ROOT / "launch" / "slurm" / "train.sbatch"),
            *run_flags(shards, tmp_path / "runs", "slurm"), "--epochs", str(EPOCHS),
            "--no-resample"]  # fmt: skip
    job = slurm.submit(args, job_env(tmp_path), cwd=ROOT)

    def log() -> str:
        return out.read_text() if out.is_file() else ""

    deadline = time.monotonic() + 240
    while not train_lines(run_dir) and time.monotonic() < deadline:
        assert slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), log()[-3000:]
        time.sleep(0.5)
    assert train_lines(run_dir), f"training never started\n{log()[-3000:]}"
    # A limit 60-120 s from now: the USR1 warning (115 s before the end) is due at once, and
    # the job has over a minute to checkpoint before Slurm would kill it.
    elapsed = seconds(slurm.job(job)["RunTime"])
    slurm.cmd("scontrol", "update", f"JobId={job}", f"TimeLimit={elapsed // 60 + 2}")
    info = slurm.wait(
        job, lambda j: j["Restarts"] == "1" and j["JobState"] == "PENDING", 180, "requeue"
    )
    first = log()
    assert "time limit near: checkpointing and requeueing" in first, first[-3000:]
    last = run_dir / "checkpoints" / "last"
    meta = json.loads((last / "meta.json").read_text())
    saved = meta["step"]
    assert meta["world_size"] == 2 and 0 < saved < uninterrupted_steps(shards), first[-3000:]
    for rank in (0, 1):
        assert f"[rank {rank}] checkpoint saved at step {saved}" in first, first[-3000:]
        assert (last / f"random_states_{rank}.pkl").is_file()
    assert f"requeueing job {job}" in first
    # Slurm holds a requeued job back ~2 minutes (BeginTime); release it sooner, with time to
    # finish. Not at once: slurmd revokes the previous run's job credential, and a start within
    # that second is killed as "Job credential revoked" (seen in slurmctld's log).
    slurm.cmd("scontrol", "update", f"JobId={job}", "TimeLimit=10", "StartTime=now+10")
    info = slurm.wait(job, lambda j: j["JobState"] not in ("PENDING", "RUNNING", "COMPLETING"),
                      420, "the resumed job's end")  # fmt: skip
    text = log()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (
        f"{text[-3000:]}\n{info}\n{slurm.daemon_logs()}"
    )
    assert f"job {job} (restart 1)" in text
    assert f"step {saved}" in text.split(f"job {job} (restart 1)")[1]  # resumed, not restarted
    final = json.loads((last / "meta.json").read_text())
    assert final["step"] == uninterrupted_steps(shards) and final["epoch"] == EPOCHS
    steps = [x["step"] for x in train_lines(run_dir)]
    # Each step trained once; the preempted step's log line is the only one that may be absent.
    assert len(steps) == len(set(steps)) and set(range(1, final["step"] + 1)) - set(steps) <= {
        saved
    }
    print(
        "\n".join(
            line
            for line in text.splitlines()
            if any(
                k in line
                for k in (
                    "time limit",
                    "checkpoint saved",
                    "requeue",
                    "resumed",
                    "restart",
                    "SIGTERM",
                    "PROBE",
                )
            )  # fmt: skip
        )
        + f"\nfinished at step {final['step']} (uninterrupted: {uninterrupted_steps(shards)})"
    )
