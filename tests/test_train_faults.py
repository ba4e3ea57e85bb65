"""Training under faults, through the real CLI on tiny real-image shards: a kill at a chosen
checkpoint operation, SIGTERM to the whole process group, a full disk, a hostile checkpoint
file, a resume with incompatible settings, a model name that does not exist."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from faultkit import Payload, live_payload
from safetensors.torch import load_file
from trainkit import ROOT, env, run, run_flags, train_cmd

from histodist import train
from histodist.errors import EXIT_FAILURE, EXIT_OK
from histodist.training.checkpoint import read_meta, states

EPOCHS = ["--epochs", "2", "--deterministic", "--seed", "3"]


@pytest.fixture(scope="module")
def shards(tiny_pcam_shards):
    return tiny_pcam_shards


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """The final weights of an uninterrupted 2-epoch run (16 steps)."""
    runs = tmp_path_factory.mktemp("runs")
    assert train.main([*run_flags(shards, runs, "ref"), *EPOCHS]) == 0
    return load_file(str(runs / "ref" / "checkpoints" / "last" / "model.safetensors"))


def _same_weights(reference: dict, run_dir) -> None:
    got = load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))
    assert got.keys() == reference.keys()
    for k in reference:
        assert torch.equal(got[k], reference[k]), k


# A 2-epoch run checkpointing every 4 steps saves at steps 4, 8, 8 (the epoch's validation:
# metadata and `best` only), 12, 16, 16. os.replace #5 publishes the state of step 8 (where
# a kill between two renames of the older layout lost `last`); #8 points `best` at it at the
# epoch end. tests/test_checkpoint.py kills at every other operation, in-process.
@pytest.mark.slow
@pytest.mark.parametrize("fault", ["replace:5", "replace:8"])
def test_kill_during_checkpointing_then_resume_equals_uninterrupted(
    shards, reference, tmp_path, fault
):
    args = [*run_flags(shards, tmp_path, "k"), *EPOCHS, "--checkpoint-every", "4"]
    code = "import sys, faultkit; faultkit.install_from_env(); from histodist import train; "
    code += "sys.exit(train.main(sys.argv[1:]))"
    killed = run([sys.executable, "-c", code, *args], HISTODIST_FAULT_AT=fault)
    assert killed.returncode == 137, killed.stderr[-2000:]
    res = run(train_cmd(*args, "--resume"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed" in res.stdout + res.stderr
    _same_weights(reference, tmp_path / "k")
    root = tmp_path / "k" / "checkpoints"
    assert read_meta(root / "last")["step"] == 16
    assert read_meta(root / "best")["step"] == read_meta(root / "last")["best_step"]
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers_checkpoints(shards, tmp_path):
    """What `timeout`, `docker stop`, Kubernetes and Slurm do: the signal reaches the
    DataLoader workers too; they must survive it so that the trainer checkpoints."""
    args = [*run_flags(shards, tmp_path, "pg"), *EPOCHS, "--workers", "1"]
    proc = subprocess.Popen(train_cmd(*args), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    metrics = tmp_path / "pg" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and sum(1 for _ in metrics.open()) >= 3:
            os.killpg(proc.pid, signal.SIGTERM)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: saved" in out and "killed by signal" not in out, out[-3000:]
    assert 0 < read_meta(tmp_path / "pg" / "checkpoints" / "last")["step"] < 16


@pytest.mark.slow
def test_full_disk_is_one_line_and_resume_works_once_space_is_freed(
    shards, reference, tmp_path, monkeypatch, capsys
):
    args = [*run_flags(shards, tmp_path, "full"), *EPOCHS]
    real_save, calls = torch.save, []

    def full_at_second_state(obj, f, *a, **kw):
        calls.append(str(f))
        if str(f).endswith("optimizer.bin") and len([c for c in calls if "optim" in c]) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_at_second_state)
    assert train.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on device" in err[0], err
    root = tmp_path / "full" / "checkpoints"
    assert str(root) in err[0] and "MiB free" in err[0] and "MiB needed" in err[0]
    assert sorted(p.name for p in root.iterdir()) == ["best", "last", "step-000000008"]
    monkeypatch.undo()
    assert train.main([*args, "--resume"]) == 0
    _same_weights(reference, tmp_path / "full")


@pytest.mark.slow
def test_resume_of_an_ema_run_never_unpickles_a_checkpoint_file(shards, tmp_path, capsys):
    """A pickled payload over each file of the newest state in turn, and as accelerate's
    custom-object file (where accelerate's register_for_checkpointing would keep the EMA):
    resume never runs it."""
    args = [*run_flags(shards, tmp_path, "ema"), "--epochs", "1", "--ema", "0.9",
            "--keep-last", "1"]  # fmt: skip
    assert train.main(args) == 0
    root = tmp_path / "ema" / "checkpoints"
    newest = states(root)[0]
    names = sorted(p.name for p in newest.iterdir()) + ["custom_checkpoint_0.pkl"]
    assert "model_ema.safetensors" in names and "optimizer.bin" in names
    marker = live_payload(tmp_path)
    for name in names:
        saved = tmp_path / "saved"
        shutil.copytree(root, saved, symlinks=True)
        torch.save(Payload(marker), newest / name)
        rc = train.main([*args, "--resume"])
        assert not marker.exists(), name
        assert rc in (EXIT_OK, EXIT_FAILURE), name  # resumed, or refused in one line
        shutil.rmtree(root)
        shutil.move(saved, root)
    capsys.readouterr()


@pytest.mark.slow
def test_resume_with_another_model_is_refused_and_writes_nothing(shards, tmp_path, capsys):
    args = [*run_flags(shards, tmp_path, "d"), "--epochs", "1"]
    assert train.main(args) == 0
    run_dir = tmp_path / "d"
    before = {p: p.read_bytes() for p in (run_dir / "config.yaml", run_dir / "manifest.json")}
    capsys.readouterr()
    rc = train.main([*args, "--resume", "--model", "resnet18", "--image-size", "64",
                     "--epochs", "3"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "model.model small-cnn -> resnet18" in err[0]
    assert "data.image_size 32 -> 64" in err[0] and "epochs" not in err[0]
    assert {p: p.read_bytes() for p in before} == before
    # A change the state can take (more epochs) resumes, then config.yaml records it.
    assert train.main([*args[:-1], "2", "--resume"]) == 0
    assert "epochs: 2" in (run_dir / "config.yaml").read_text()


def test_unknown_model_is_one_line_before_anything_is_created(shards, tmp_path, capsys):
    rc = train.main([*run_flags(shards, tmp_path, "m"), "--model", "resnet181"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "did you mean resnet18" in err[0], err
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_truncated_weights_in_evaluate_and_predict_are_one_line(shards, tmp_path, capsys):
    from histodist import evaluate, predict

    assert train.main([*run_flags(shards, tmp_path, "t"), "--epochs", "1"]) == 0
    weights = tmp_path / "t" / "checkpoints" / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    capsys.readouterr()
    run_arg = ["--run", str(tmp_path / "t"), "--workers", "0", "--no-progress"]
    rc = evaluate.main([*run_arg, "--split", "valid", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "model.safetensors" in err[0], err
    rc = predict.main([*run_arg, "--input", str(shards), "--split", "valid",
                       "--out", str(tmp_path / "p.csv")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "model.safetensors" in err[0], err
