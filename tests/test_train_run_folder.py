"""A run folder belongs to one training at a time (a lock the kernel releases when its holder
dies), resumes only on the data it trained on, and says what a resume could not restore."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from faultkit import Payload, live_payload
from shardkit import pcam_images, write_shards
from trainkit import ROOT, env, processes_with, run_flags, train_cmd

from histodist import train
from histodist.training import runlock

HOLD = "import sys, time; from histodist.training import runlock; held = runlock.acquire(sys.argv[1]); "
HOLD += "print('held', flush=True); time.sleep(600)"


def _holder(run_dir) -> subprocess.Popen:
    """A process that holds `run_dir`'s lock until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    holder = _holder(tmp_path / "r")
    try:
        with pytest.raises(runlock.RunFolderBusy, match=f"pid {holder.pid} on .*, started "):
            runlock.acquire(tmp_path / "r")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock, warning = runlock.acquire(tmp_path / "r")  # kill -9 left no stale lock
    assert lock is not None and warning is None
    assert f"pid {os.getpid()} on " in (tmp_path / "r" / runlock.NAME).read_text()
    lock.release()


@pytest.mark.slow
def test_a_trainer_killed_with_its_workers_alive_frees_the_folder(tiny_pcam_shards, tmp_path):
    """kill -9 of the trainer only: its DataLoader workers live on for a few seconds (until
    they notice), yet a restart can take the folder at once."""
    args = train_cmd(*run_flags(tiny_pcam_shards, tmp_path, "k"), "--workers", "2",
                     "--epochs", "50")  # fmt: skip
    proc = subprocess.Popen(args, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    metrics = tmp_path / "k" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (
        metrics.is_file() and metrics.read_text().count("\n") > 1
    ):
        time.sleep(0.1)  # a training step logged: the workers run
    workers = [p for p in processes_with(str(tmp_path)) if not p.startswith(f"{proc.pid}:")]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    try:
        assert workers, "the run had no DataLoader workers"
        lock, _ = runlock.acquire(tmp_path / "k")  # would raise RunFolderBusy if they held it
        lock.release()
    finally:
        for line in processes_with(str(tmp_path)):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)


@pytest.fixture(scope="module")
def trained(tiny_pcam_shards, tmp_path_factory):
    """A run folder after one epoch (8 steps) on the tiny shards."""
    runs = tmp_path_factory.mktemp("runs")
    assert train.main([*run_flags(tiny_pcam_shards, runs, "base"), "--epochs", "1"]) == 0
    return runs / "base"


def _copy(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "runs" / "r", symlinks=True)
    return tmp_path / "runs"


@pytest.mark.slow
def test_resume_on_other_data_is_refused_naming_what_changed(
    trained, tiny_pcam_shards, pcam_jpeg, tmp_path, capsys
):
    runs = _copy(trained, tmp_path)
    capsys.readouterr()
    # The same valid shards; train shards of other images (same classes and counts).
    other = shutil.copytree(tiny_pcam_shards, tmp_path / "other")
    more = pcam_images(pcam_jpeg, "train", 64)
    train_split = write_shards(tmp_path / "new", {"train": more[32:64] + more[96:128]}, 16)
    for tar in (tmp_path / "new").glob("train-*.tar"):
        shutil.copy(tar, other / tar.name)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["splits"]["train"] = train_split["splits"]["train"]
    (other / "manifest.json").write_text(json.dumps(manifest))
    files = [p for p in (runs / "r").iterdir() if p.is_file() and p.name != runlock.NAME]
    kept = {p: p.read_bytes() for p in files}
    rc = train.main([*run_flags(other, runs, "r"), "--epochs", "2", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "other data than" in err[0] and "manifest.json" in err[0], err
    assert "train shards with other contents: train-000000.tar, train-000001.tar, " in err[0]
    assert "valid" not in err[0].split("other data than")[1], err  # the same valid shards
    assert {p: p.read_bytes() for p in files} == kept  # config.yaml, manifest.json, ...
    # The same data elsewhere, written again (other provenance), resumes.
    same = tmp_path / "same"
    shutil.copytree(tiny_pcam_shards, same)
    manifest = json.loads((same / "manifest.json").read_text())
    manifest.update(created="2030-01-01T00:00:00Z", command="python -m histodist.shard ...")
    (same / "manifest.json").write_text(json.dumps(manifest))
    assert train.main([*run_flags(same, runs, "r"), "--epochs", "2", "--resume"]) == 0


@pytest.mark.slow
def test_a_refused_random_state_is_said_in_one_line(trained, tiny_pcam_shards, tmp_path, capsys):
    """A random-state file that is not a safe format (here a live pickle payload) is not
    loaded, and the resume says so: the run is no longer bitwise reproducible."""
    runs = _copy(trained, tmp_path)
    marker = live_payload(tmp_path)
    rng = runs / "r" / "checkpoints" / "last" / "random_states_0.pkl"
    torch.save(Payload(marker), rng)
    capsys.readouterr()
    args = [*run_flags(tiny_pcam_shards, runs, "r"), "--epochs", "2", "--resume"]
    assert train.main(args) == 0
    assert not marker.exists()
    said = [line for line in capsys.readouterr().out.splitlines() if "random_states_0" in line]
    assert len(said) == 1 and "not restored" in said[0] and "bitwise" in said[0], said


def test_a_resumed_run_log_drops_the_partial_line_of_a_killed_run(tmp_path):
    """A run killed (or out of disk) mid-write leaves half a JSON line at the end of
    metrics.jsonl; the resumed run's lines used to follow it on the same line, and every
    reader of the file (json per line) failed there."""
    from types import SimpleNamespace

    from histodist.training.tracking import RunLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 0.7}\n{"step": 2, "train/lo')
    log = RunLog(SimpleNamespace(is_main_process=True), tmp_path, use_wandb=False)
    log.log({"train/loss": 0.5}, step=2)
    log.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(x["step"], x["train/loss"]) for x in lines] == [(1, 0.7), (2, 0.5)]
