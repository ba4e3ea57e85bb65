"""Checkpoint folders: atomic publication, rotation, best, resume after a kill at any operation,
a full disk, and files that must never be unpickled."""

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from faultkit import FaultPlan, Killed, Payload, live_payload

from histodist.training import checkpoint as ck
from histodist.training.checkpoint import (
    CheckpointError,
    find_checkpoint,
    read_meta,
    resume,
    save_last,
    states,
)

# (step, improved) of a short run: a save per validation, a second save at the same step
# (a step checkpoint then the epoch's validation), and saves that are not the best.
SAVES = [(10, True), (20, False), (20, True), (30, False), (40, True), (50, False)]


def _parts(seed: int = 0):
    acc = Accelerator(cpu=True)
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt = acc.prepare(model, opt)
    return acc, model, opt


def _train_to(model, opt, step: int) -> None:
    """A state that identifies its step: weights = step, a momentum buffer that depends on it."""
    opt.zero_grad()
    model(torch.ones(1, 4)).sum().backward()
    for g in opt.param_groups:
        g["lr"] = step / 1000
    opt.step()
    with torch.no_grad():
        model.weight.fill_(step)
        model.bias.fill_(-step)


def _run(acc, model, opt, root: Path, saves, best=(-1, None), keep_last: int = 2):
    best_step, _ = best
    for step, improved in saves:
        _train_to(model, opt, step)
        if improved:
            best_step = step
        meta = {"step": step, "epoch": step // 20, "best_step": best_step}
        save_last(acc, root, meta, keep_last=keep_last, best=improved,
                  extra={"model_ema.safetensors": {"w": model.weight * 2}})  # fmt: skip


def _layout(root: Path) -> dict:
    return {
        "states": [p.name for p in states(root)],
        "last": os.readlink(root / "last"),
        "best": os.readlink(root / "best"),
        "hidden": sorted(p.name for p in root.iterdir() if p.name.startswith(".")),
    }


def test_rotation_best_layout_and_weights(tmp_path):
    acc, model, opt = _parts()
    root = tmp_path / "checkpoints"
    _run(acc, model, opt, root, SAVES)
    # keep_last=2: the two newest states plus the best one; no temporary left.
    assert _layout(root) == {
        "states": ["step-000000050", "step-000000040"],
        "last": "step-000000050",
        "best": "step-000000040",
        "hidden": [],
    }
    assert read_meta(root / "best")["step"] == 40 and read_meta(root / "last")["best_step"] == 40
    assert find_checkpoint(tmp_path, "best") == root / "step-000000040"
    assert find_checkpoint(tmp_path, "last") == root / "last"
    acc.load_state(str(root / "best"))
    assert torch.all(model.weight == 40)


def _reference(tmp_path) -> tuple[int, list]:
    """Operations of the uninterrupted sequence, and the final layout."""
    acc, model, opt = _parts()
    root = tmp_path / "reference"
    with FaultPlan() as plan:
        _run(acc, model, opt, root, SAVES)
    return plan.n, _layout(root)


@pytest.mark.slow
def test_kill_at_every_operation_then_resume_continues_exactly(tmp_path):
    """A kill at each file operation of six saves (rename, symlink, removal, copy, fsync,
    every file write), then a resume: it loads a complete state of the newest step that was
    published (weights and optimizer of that step), repairs `best`, and the rest of the run
    ends in the same layout as an uninterrupted one."""
    total, final = _reference(tmp_path)
    assert total > 60
    for k in range(1, total + 1):
        root = tmp_path / f"k{k}" / "checkpoints"
        acc, model, opt = _parts()
        with pytest.raises(Killed), FaultPlan(k):
            _run(acc, model, opt, root, SAVES)
        acc, model, opt = _parts(seed=k)  # a new process: other initial weights
        meta = resume(acc, root, say=lambda _: None)
        if meta is None:  # killed before the first state was published
            assert not states(root), k
            done = []
        else:
            step = meta["step"]
            assert torch.all(model.weight == step) and torch.all(model.bias == -step), k
            assert opt.param_groups[0]["lr"] == step / 1000, k
            assert opt.state[model.weight]["momentum_buffer"].abs().sum() > 0, k
            best = find_checkpoint(root.parent, "best")
            assert read_meta(best)["step"] == meta["best_step"], k
            assert os.readlink(root / "last") == ck.STEP.format(step), k
            at = [s for s in SAVES if s[0] == step]  # the second save at a step is the best
            done = [s for s in SAVES if s[0] < step] + at[: 2 if meta["best_step"] == step else 1]
        rest = SAVES[len(done) :]
        prior = max((s for s, imp in done if imp), default=-1)
        _run(acc, model, opt, root, rest, best=(prior, None))
        assert _layout(root) == final, k


def test_resume_falls_back_to_older_state_and_best_is_repaired(tmp_path, capsys):
    acc, model, opt = _parts()
    root = tmp_path / "checkpoints"
    _run(acc, model, opt, root, SAVES[:4])  # states 30 and 20, best -> 20
    (root / "step-000000030" / "optimizer.bin").write_bytes(b"garbage")
    os.unlink(root / "best")
    acc, model, opt = _parts(seed=1)
    meta = resume(acc, root)
    out = capsys.readouterr().out
    assert meta["step"] == 20 and torch.all(model.weight == 20)
    assert "step-000000030: cannot load" in out and "resuming from" in out
    assert "best: repaired" in out
    assert os.readlink(root / "last") == "step-000000020"
    assert os.readlink(root / "best") == "step-000000020"
    assert (root / "unloadable-step-000000030").is_dir()
    # Every state unloadable: an error, never a silent fresh start.
    (root / "step-000000020" / "model.safetensors").write_bytes(b"garbage")
    acc, model, opt = _parts(seed=1)
    with pytest.raises(CheckpointError, match="no checkpoint loads"):
        resume(acc, root, say=lambda _: None)


def test_resume_completes_states_an_older_layout_left_between_its_renames(tmp_path):
    """The previous layout (real last / best folders swapped by two renames) left a complete
    .tmp-last and no last when killed between them; resume finds it."""
    acc, model, opt = _parts()
    root = tmp_path / "checkpoints"
    _run(acc, model, opt, root, SAVES[:2])  # states 10 (best) and 20
    shutil.copytree(root / "step-000000010", root / "step-000000004")
    (root / "step-000000004" / "meta.json").write_text(json.dumps({"step": 4, "best_step": -1}))
    for link in ("last", "best"):
        os.unlink(root / link)
    os.replace(root / "step-000000020", root / ".tmp-last")
    os.replace(root / "step-000000010", root / "best")
    acc, model, opt = _parts(seed=1)
    assert resume(acc, root, say=lambda _: None)["step"] == 20
    assert torch.all(model.weight == 20)
    assert [p.name for p in states(root)] == ["step-000000020", "step-000000010", "step-000000004"]
    assert os.readlink(root / "best") == "step-000000010"


def test_evaluate_never_uses_a_stale_or_missing_best(tmp_path):
    acc, model, opt = _parts()
    root = tmp_path / "checkpoints"
    _run(acc, model, opt, root, SAVES)  # states 50 and 40, best -> 40
    ck._point(root, "best", "step-000000050")  # stale: as if a kill came before best moved
    assert find_checkpoint(tmp_path, "best") == root / "step-000000040"
    shutil.rmtree(root / "step-000000040")
    with pytest.raises(CheckpointError, match="best state .step 40.*missing"):
        find_checkpoint(tmp_path, "best")


def test_full_disk_one_line_error_partial_removed_resume_works(tmp_path, monkeypatch):
    acc, model, opt = _parts()
    root = tmp_path / "checkpoints"
    _run(acc, model, opt, root, SAVES[:2])
    before = _layout(root)
    real_save = torch.save

    def full(obj, f, *a, **kw):
        if str(f).endswith("optimizer.bin"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError) as e:
        _run(acc, model, opt, root, SAVES[3:4])
    msg = str(e.value)
    assert "\n" not in msg and str(root) in msg and "no space left" in msg
    assert "MiB free" in msg and "MiB needed" in msg
    assert _layout(root) == before  # partial folder removed, previous states intact
    # A free-space check before writing: the newest state's size against the free space.
    monkeypatch.setattr(torch, "save", real_save)
    usage = shutil.disk_usage(root)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=100))
    with pytest.raises(CheckpointError, match="not enough space.*0 MiB free"):
        _run(acc, model, opt, root, SAVES[3:4])
    assert _layout(root) == before
    monkeypatch.undo()  # space freed: resume and save again
    acc, model, opt = _parts(seed=2)
    assert resume(acc, root, say=lambda _: None)["step"] == 20
    _run(acc, model, opt, root, SAVES[3:4], best=(20, None))
    assert os.readlink(root / "last") == "step-000000030"


def test_no_checkpoint_file_is_ever_unpickled(tmp_path):
    """A pickled payload written over each file of a state in turn (and as an accelerate
    custom-object file): resume never runs it; it falls back to the older state instead."""
    acc, model, opt = _parts()
    root = tmp_path / "checkpoints"
    _run(acc, model, opt, root, SAVES[:2])
    newest = root / "step-000000020"
    files = sorted(p.name for p in newest.iterdir()) + ["custom_checkpoint_0.pkl"]
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "meta.json"} <= set(files)
    marker = live_payload(tmp_path)
    for name in files:
        original = (newest / name).read_bytes() if (newest / name).is_file() else None
        torch.save(Payload(marker), newest / name)
        acc, model, opt = _parts(seed=1)
        with contextlib.suppress(CheckpointError):
            resume(acc, root, say=lambda _: None)
        assert not marker.exists(), name
        for p in root.glob("unloadable-*"):
            os.replace(p, root / p.name.removeprefix("unloadable-"))
        if original is None:
            (newest / f"{name}.ignored").unlink()
        else:
            (newest / name).write_bytes(original)
