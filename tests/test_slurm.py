"""launch/slurm/train.sbatch on a real one-node Slurm (tests/slurmkit.py), CPU only.

Two training processes on one node (GPUS_PER_NODE=2, ACCELERATE_USE_CPU=true, no GPU gres)
train on tiny real PCam shards. Once training runs, the job's time limit is cut to the next
whole minute plus one, so Slurm's own time-limit warning (--signal=B:USR1@115) is due at once
and reaches the batch script at slurmctld's next check. The first run pauses after each step
(tests/slurm_probe.py) so that the warning lands mid-training on any machine. Checked: the
warning arrives, both ranks save checkpoints/last, the job requeues itself, and the requeued
job resumes the same run and ends at the step count of an uninterrupted run.

launch/slurm/shard_wsi.sbatch runs as a 3-task array tiling synthetic slides; one task is
requeued by the script's own time-limit path mid-tiling and resumes; the shards and manifest
equal a one-process run's. Skipped, with the reason, where Slurm cannot start (not root,
packages missing).
"""

from __future__ import annotations

import json
import math
import os
import re
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


def _shard_bytes(out: Path) -> dict[str, bytes]:
    m = json.loads((out / "manifest.json").read_text())
    return {sh["name"]: (out / sh["name"]).read_bytes()
            for s in m["splits"].values() for sh in s["shards"]}  # fmt: skip


def _manifest(out: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    del m["created"], m["command"]
    return m


def _tile_keys(out: Path) -> list[str]:
    import tarfile

    keys = []
    for name in _shard_bytes(out):
        with tarfile.open(out / name) as tar:
            keys += [m.name.split(".", 1)[0] for m in tar if m.name.endswith(".json")]
    return keys


def test_slurm_array_tiles_slides_like_one_process_and_a_requeued_task_resumes(
    slurm_cluster, tmp_path, pcam_jpeg
):
    """launch/slurm/shard_wsi.sbatch as a 3-task array over 6 synthetic slides of real PCam
    patches, one CPU per task. Task 2 stops after its first slide part (tests/shard_probe.py)
    and gets the script's time-limit warning (USR1 to the batch script): it requeues itself,
    alone (the last task's job id is the array's own), and tasks 0 and 1 finish meanwhile,
    leaving the manifest to the last. The requeued task reuses its finished part, finishes,
    and writes the manifest, once. Shards byte-identical
    to a one-process run's, the same manifest (but `created` and `command`), every tile once."""
    pytest.importorskip("openslide", reason="the wsi extra (openslide) is not installed")
    from slidekit import make_cohort

    from histodist import shard

    slurm = slurm_cluster
    make_cohort(tmp_path, pcam_jpeg)
    flags = ["--src", str(tmp_path / "slides"), "--labels", str(tmp_path / "slides.csv"),
             "--mpp", "0.25", "--tile-size", "64", "--samples-per-shard", "100",
             "--val-fraction", "0.2", "--test-fraction", "0", "--name", "cohort"]  # fmt: skip
    ref, out = tmp_path / "ref", tmp_path / "array"
    assert shard.main(["--dataset", "wsi", *flags, "--workers", "1", "--out", str(ref)]) == 0
    mark, writes = tmp_path / "paused", tmp_path / "manifest-writes.log"
    e = env(SHARD_MODULE="shard_probe", PROBE_PAUSE_TASK="2", PROBE_PAUSE_MARK=str(mark),
            PROBE_LOG=str(writes))  # fmt: skip
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e['PATH']}"  # this python
    logs = tmp_path / "logs"
    logs.mkdir()
    script = str(ROOT / "launch" / "slurm" / "shard_wsi.sbatch")
    job = slurm.submit(["--array=0-2", "--cpus-per-task=1", "--time=10",
                        f"--output={logs}/%a.out", script, *flags, "--out", str(out)],
                       e, cwd=ROOT)  # fmt: skip

    def log(task: int) -> str:
        path = logs / f"{task}.out"
        return path.read_text() if path.is_file() else ""

    def states() -> dict[str, str]:
        tasks = slurm.array(job)
        assert all(tasks[t]["Restarts"] == "0" for t in ("0", "1") if t in tasks), tasks
        return {k: v["JobState"] for k, v in tasks.items()}

    deadline = time.monotonic() + 120
    while not mark.exists():
        assert time.monotonic() < deadline, f"task 2 never paused: {states()}\n{log(2)[-3000:]}"
        time.sleep(0.2)
    slurm.cmd("scancel", "--batch", "--signal=USR1", f"{job}_2")  # the time-limit warning
    slurm.wait(f"{job}_2", lambda j: j["Restarts"] == "1" and j["JobState"] == "PENDING", 60,
               "task 2's requeue")  # fmt: skip
    deadline = time.monotonic() + 120
    while not all(states().get(t) == "COMPLETED" for t in ("0", "1")):
        assert time.monotonic() < deadline, f"tasks 0 and 1 did not end: {states()}"
        time.sleep(0.5)
    assert not (out / "manifest.json").exists()  # task 2's shards are missing yet
    # Slurm holds a requeued job ~2 minutes; release it (not at once: a start within a second
    # of the requeue can be killed as "Job credential revoked", see the training test).
    slurm.cmd("scontrol", "update", f"JobId={job}_2", "StartTime=now+3")
    info = slurm.wait(f"{job}_2", lambda j: j["JobState"] not in ("PENDING", "RUNNING",
                      "COMPLETING"), 120, "the requeued task's end")  # fmt: skip
    assert info["JobState"] == "COMPLETED", f"{log(2)[-3000:]}\n{info}\n{slurm.daemon_logs()}"
    first, second = log(2).split(f"array task {job}_2 (restart 1)")
    assert f"time limit near: requeueing task {job}_2" in first
    assert "slide parts were finished by an earlier run: reused" in second
    assert "rank 2 of 3: every shard is finished: wrote the manifest" in second
    for task in (0, 1):  # one run each, untouched by task 2's requeue
        assert f"rank {task} of 3: shards written; the last rank" in log(task), log(task)
        assert "(restart 1)" not in log(task) and slurm.job(f"{job}_{task}")["Restarts"] == "0"
    assert writes.read_text().splitlines() == ["manifest 2"]  # once, by the last task
    assert _shard_bytes(out) == _shard_bytes(ref)
    assert _manifest(out) == _manifest(ref)
    keys = _tile_keys(out)
    assert len(keys) == len(set(keys)) == sum(s["num_samples"] for s in
                                              _manifest(ref)["splits"].values())  # fmt: skip
    assert shard.main(["--verify", str(out)]) == 0
    said = r"(?:\[histodist\.launch\]|histodist\.shard:)[^\r\n]*"  # not the progress bars
    print("\n".join(line for t in range(3) for line in re.findall(said, log(t))))
