"""Every error of a training run ends every process of the run within seconds, DataLoader
workers included, with one line per process and the documented exit code: bad shards, a
manifest that disagrees with a shard, a full disk (config.yaml at the start, the first
checkpoint, a plot during validation), a second run in the same folder. On one process with
workers, and on two under a real `accelerate launch`, where a rank that fails while the other
waits in a collective must not leave the other waiting.

The workers ignore SIGTERM (so that a signal to the process group cannot kill them before the
trainer checkpoints); histodist.data.workers ends them on every way out."""

import concurrent.futures
import json
import multiprocessing
import os
import shutil

import pytest
from trainkit import FAULTY_TRAIN, bounded_run, launch_cmd, run_flags, train_cmd

from histodist import train
from histodist.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from histodist.training import runlock

pytestmark = pytest.mark.slow
# A hang never ends; a healthy failure takes the start-up (~5-15 s on a loaded 2-core machine).
TIMEOUT = 150
WORKERS = ["--workers", "1", "--epochs", "1"]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "histodist.train: error:" in line]


def _shards(src, dst, trigger: str):
    """A copy of the tiny shards broken as `trigger` says; the shard it breaks."""
    shutil.copytree(src, dst)
    bad = dst / "train-000001.tar"
    if trigger == "missing":
        bad.unlink()
    elif trigger == "empty":
        bad.write_bytes(b"")
    elif trigger == "truncated":
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 3])
    elif trigger == "miscounted":  # the manifest says 20 samples where the shard holds 16
        manifest = json.loads((dst / "manifest.json").read_text())
        manifest["splits"]["train"]["shards"][1]["num_samples"] += 4
        manifest["splits"]["train"]["num_samples"] += 4
        (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _check(res, seconds, left, code, expect: str, processes: int = 1) -> list[str]:
    log = res.stdout + res.stderr
    print(f"exit {res.returncode} after {seconds:.1f} s: {error_lines(log)}")
    assert not left, left  # every process of the run ended (workers too)
    assert res.returncode == code, log[-3000:]
    assert "Traceback" not in res.stderr or processes > 1, res.stderr[-3000:]
    lines = error_lines(log)
    assert lines and any(expect in line for line in lines), log[-3000:]
    return lines


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("trigger", ["missing", "empty", "truncated", "miscounted"])
def test_a_bad_shard_is_one_line_and_ends_the_workers(tiny_pcam_shards, tmp_path, trigger, capsys):
    """In process: the error returns with no DataLoader worker left (a live one, which ignores
    SIGTERM, is what kept a process from exiting)."""
    shards = _shards(tiny_pcam_shards, tmp_path / "shards", trigger)
    assert train.main([*run_flags(shards, tmp_path / "runs", "r"), *WORKERS]) == EXIT_FAILURE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "train-000001.tar" in lines[0], lines
    assert not multiprocessing.active_children()


def test_a_bad_shard_with_workers_ends_the_process(tiny_pcam_shards, tmp_path):
    """The same as a process: empty one train shard, train with workers (under a timeout)."""
    shards = _shards(tiny_pcam_shards, tmp_path / "shards", "empty")
    runs = tmp_path / "runs"
    cmd = train_cmd(*run_flags(shards, runs, "r"), *WORKERS)
    res, seconds, left = bounded_run(cmd, str(runs), timeout=TIMEOUT)
    lines = _check(res, seconds, left, EXIT_FAILURE, "train-000001.tar: 0 samples")
    assert len(lines) == 1, lines


@pytest.mark.parametrize(
    ("fault", "flags", "expect"),
    [
        ("config.yaml", [], "config.yaml: No space left on device"),
        ("optimizer.bin", ["--checkpoint-every", "2"], "cannot write a checkpoint"),
        ("roc.png:2", ["--eval-every", "2"], "roc.png: No space left on device"),
    ],
    ids=["config-at-start", "first-checkpoint", "plot-in-validation"],
)
def test_a_full_disk_is_one_line_and_keeps_what_was_written(
    tiny_pcam_shards, tmp_path, fault, flags, expect
):
    runs = tmp_path / "runs"
    cmd = train_cmd(*run_flags(tiny_pcam_shards, runs, "r"), *WORKERS, *flags)
    cmd[1:3] = [str(FAULTY_TRAIN)]  # python faulty_train.py <flags>
    res, seconds, left = bounded_run(cmd, str(runs), timeout=TIMEOUT, FULL_DISK=fault)
    lines = _check(res, seconds, left, EXIT_FAILURE, expect)
    assert len(lines) == 1 and "--resume" in lines[0], lines
    run_dir = runs / "r"
    assert not [p for p in run_dir.rglob(".*.tmp")], "a temporary file was left"
    if fault == "config.yaml":
        assert not (run_dir / "config.yaml").exists()
    if fault.startswith("roc.png"):  # the first validation's state and plot are intact
        assert os.readlink(run_dir / "checkpoints" / "last") == "step-000000002"
        assert (run_dir / "plots" / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_runs_started_together_in_one_folder(tiny_pcam_shards, tmp_path):
    """One gets the run folder and trains; the other stops at once, naming it."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "same").symlink_to(tmp_path / "runs")  # one folder, by two names (markers)
    cmds = [train_cmd(*run_flags(tiny_pcam_shards, tmp_path / name, "r"), *WORKERS,
                      "--epochs", "2") for name in ("runs", "same")]  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda c: bounded_run(c, c[c.index("--runs-dir") + 1],
                                                   timeout=TIMEOUT), cmds))  # fmt: skip
    (won, *_), (lost, seconds, left) = sorted(runs, key=lambda r: r[0].returncode)
    assert won.returncode == EXIT_OK, won.stderr[-3000:]
    lines = _check(lost, seconds, left, EXIT_USAGE, "in use by another training run")
    holder = (tmp_path / "runs" / "r" / runlock.NAME).read_text().strip()  # the winner's line
    assert holder.startswith("pid ") and " on " in holder and "started" in holder, holder
    assert len(lines) == 1 and f"({holder})" in lines[0], lines


# Two processes: the three ways an error reaches the ranks. A shard that only one rank reads
# (the other waits in DDP's all-reduce), a full disk at the checkpoint (the ranks agree on the
# failure), the run folder's lock held elsewhere (the main process finds it; the other waits
# for its answer).
@pytest.mark.parametrize("mechanism", ["one-rank-data", "agreed-checkpoint", "main-process-lock"])
def test_two_processes_end_together(tiny_pcam_shards, tmp_path, mechanism):
    shards = tiny_pcam_shards
    if mechanism == "one-rank-data":
        shards = _shards(tiny_pcam_shards, tmp_path / "shards", "empty")
    runs = tmp_path / "runs"
    flags = [*run_flags(shards, runs, "r"), *WORKERS, "--checkpoint-every", "2"]
    extra, lock = {"ACCELERATE_USE_CPU": "true"}, None
    if mechanism == "agreed-checkpoint":
        extra["FULL_DISK"] = "optimizer.bin"
    if mechanism == "main-process-lock":
        lock, _ = runlock.acquire(runs / "r")  # held by this (the test's) process
    try:
        cmd = launch_cmd(str(FAULTY_TRAIN), *flags)
        res, seconds, left = bounded_run(cmd, str(runs), timeout=TIMEOUT, **extra)
    finally:
        if lock is not None:
            lock.release()
    log = res.stdout + res.stderr
    assert "[rank0]: Traceback" not in log and "[rank1]: Traceback" not in log, log[-4000:]
    # torch's elastic agent exits 1 when a rank fails, whatever the rank's code.
    expect = {"one-rank-data": "train-000001.tar", "agreed-checkpoint": "cannot write a checkpoint",
              "main-process-lock": f"pid {os.getpid()} on "}[mechanism]  # fmt: skip
    lines = _check(res, seconds, left, EXIT_FAILURE, expect, processes=2)
    assert len(lines) == 2, lines  # one line from each rank: two processes ran
    if mechanism == "one-rank-data":
        assert any("another process of this run stopped" in line for line in lines), lines
