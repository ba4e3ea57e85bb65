"""Checkpoints of a run: atomic full training states (last, best, older step-*) and model loading.

Layout under runs/<name>/checkpoints/:
  last/      newest full state: accelerate's save_state (model.safetensors, optimizer.bin,
             scheduler.bin, scaler.pt with fp16, random_states_<rank>.pkl, custom states such as
             the EMA) plus meta.json {"epoch", "batch_in_epoch", "step", ...}
  best/      a copy of the state with the best validation metric
  step-N/    older states, `keep_last - 1` of them
Every state is written into a hidden temporary folder and renamed into place, so a crash
never leaves a half-written `last` or `best`. The checkpoints folder must be on a file system
shared by all ranks (each rank writes its own RNG state).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from histodist.version import version_string


class CheckpointError(RuntimeError):
    """A missing or unreadable checkpoint; the message names the folder."""


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _swap_in(tmp: Path, dest: Path) -> None:
    """Replace folder `dest` by `tmp` (a rename; `dest` is absent only between two renames)."""
    old = dest.with_name(f".old-{dest.name}")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def save_last(
    accelerator, root: Path, meta: dict[str, Any], *, keep_last: int, extra: dict | None = None
) -> Path:
    """Save the full training state as `root/last` on every rank (collective: call on all ranks).
    The previous `last` becomes `step-<its step>`; only `keep_last` states are kept.
    `extra`: {file name: state dict} written as safetensors beside (e.g. the EMA weights)."""
    root = Path(root)
    tmp = root / ".tmp-last"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = {**meta, "histodist_version": version_string()}
        for name, sd in (extra or {}).items():
            save_weights(sd, tmp / name)
        _write_json(tmp / "meta.json", meta)
        last = root / "last"
        prev = read_meta(last) if (last / "meta.json").is_file() else None
        if prev is not None and keep_last > 1 and prev.get("step") != meta.get("step"):
            os.replace(last, root / f"step-{int(prev['step']):09d}")
        _swap_in(tmp, last)
        _prune(root, keep_last - 1)
    accelerator.wait_for_everyone()
    return root / "last"


def _prune(root: Path, keep: int) -> None:
    older = sorted(p for p in root.glob("step-*") if p.is_dir())
    for p in older[: max(0, len(older) - keep)]:
        shutil.rmtree(p, ignore_errors=True)


def copy_to_best(accelerator, root: Path, extra_meta: dict[str, Any]) -> Path:
    """Copy `root/last` to `root/best` atomically (main process), updating its meta.json."""
    root = Path(root)
    if accelerator.is_main_process:
        tmp = root / ".tmp-best"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(root / "last", tmp)
        meta = {**read_meta(tmp), **extra_meta}
        _write_json(tmp / "meta.json", meta)
        _swap_in(tmp, root / "best")
    accelerator.wait_for_everyone()
    return root / "best"


def read_meta(ckpt: str | os.PathLike) -> dict:
    path = Path(ckpt) / "meta.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint metadata ({e})") from None


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Weights alone as safetensors, atomically (temp + rename)."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(tmp))
    os.replace(tmp, path)


def find_checkpoint(run_dir: str | os.PathLike, which: str = "best") -> Path:
    """runs/<name>/checkpoints/<which>, falling back from best to last; or a checkpoint folder."""
    run_dir = Path(run_dir)
    if (run_dir / "meta.json").is_file():
        return run_dir
    for name in (which, "last") if which == "best" else (which,):
        ckpt = run_dir / "checkpoints" / name
        if (ckpt / "meta.json").is_file():
            return ckpt
    raise CheckpointError(f"{run_dir}: no checkpoints/{which} with meta.json; is it a run folder?")


def load_run_model(run_dir: str | os.PathLike, which: str = "best"):
    """(model in eval mode on CPU, Config, meta) from a run folder written by histodist.train.
    Uses the EMA weights when the run kept an EMA (meta["eval_weights"])."""
    from histodist.config import load_config, replace
    from histodist.models import build_model, read_state_dict

    run_dir = Path(run_dir)
    ckpt = find_checkpoint(run_dir, which)
    rd = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else run_dir
    cfg = load_config(rd / "config.yaml")
    meta = read_meta(ckpt)
    cfg = replace(cfg, model={"pretrained": False, "weights": None})
    model = build_model(cfg.model, num_classes=meta["num_classes"], image_size=meta["image_size"])
    sd = read_state_dict(ckpt / meta.get("eval_weights", "model.safetensors"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt}: weights do not fit {cfg.model.model} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval(), cfg, meta
