"""Checkpoints of a run: full training states published atomically, resume and model loading.

Layout under runs/<name>/checkpoints/:
  step-000000123/  one complete training state each: accelerate's save_state
                   (model.safetensors, optimizer.bin, scheduler.bin, scaler.pt with fp16,
                   random_states_<rank>.pkl), extra safetensors files (model_ema.safetensors)
                   and meta.json {"epoch", "batch_in_epoch", "step", "best_step", ...}
  last -> step-N   symlink to the newest state
  best -> step-M   symlink to the state with the best validation metric
Protocol (each line is one step a kill may interrupt; every instant leaves a resumable run):
  1. every rank writes into `.tmp-step-N` (hidden: never read, removed by the next save);
  2. the main process writes meta.json, fsyncs every file and the folder, then renames
     `.tmp-step-N` -> `step-N`: a visible `step-*` folder is always complete;
  3. `best` (when improved) and `last` are re-pointed by replacing a symlink (atomic);
  4. old states are pruned by a rename to `.del-*` before their removal.
Resume loads the newest complete `step-*` (falling back to older ones when it cannot be
loaded), then repairs `last` and `best` from its meta.json (`best_step`). A state that shares
its step with `last` (a checkpoint and a validation at the same step) only rewrites meta.json.
Every file is read with safetensors, JSON, or `torch.load(weights_only=True)`; nothing a
checkpoint holds is unpickled. The folder must be on a file system shared by all ranks (each
rank writes its own RNG state).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from histodist.errors import HistodistError
from histodist.fileio import atomic_path, atomic_write
from histodist.fileio import sync_to_disk as _fsync
from histodist.training.distributed import agree, broadcast
from histodist.version import version_string

STEP = "step-{:09d}"
# Folders an older layout (real `last` / `best` folders swapped by two renames) may leave;
# the replaced copies first, so that they are dropped while `last` / `best` still exist.
_LEGACY = (".old-last", ".old-best", ".tmp-last", "last", "best")


class CheckpointError(HistodistError, RuntimeError):
    """A missing, unreadable or unwritable checkpoint; the message names the folder."""


# ----------------------------------------------------------------------------- file system
def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            _fsync(p)
    _fsync(folder)


def _write_json(path: Path, obj: dict) -> None:
    atomic_write(path, json.dumps(obj, indent=1), fsync=True)
    _fsync(path.parent)


def _point(root: Path, name: str, target: str) -> None:
    """Make root/name a symlink to root/target, atomically (symlink beside, then rename)."""
    new = root / f".{name}.new"
    if new.is_symlink() or new.exists():
        new.unlink()
    os.symlink(target, new)
    os.replace(new, root / name)
    _fsync(root)


def _remove(path: Path) -> None:
    """Delete a folder so that no half-deleted state is ever visible: rename, then remove."""
    trash = path.with_name(f".del-{path.name}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


# ----------------------------------------------------------------------------- layout
def _complete(folder: Path) -> bool:
    return folder.is_dir() and (folder / "meta.json").is_file()


def states(root: str | os.PathLike) -> list[Path]:
    """Complete `step-*` folders under a checkpoints folder, newest first."""
    root = Path(root)
    found = [p for p in root.glob("step-*") if p.name[5:].isdigit() and _complete(p)]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def _target(link: Path) -> str | None:
    return os.readlink(link) if link.is_symlink() else None


def has_checkpoint(root: str | os.PathLike) -> bool:
    """True when the checkpoints folder holds any training state (any layout)."""
    root = Path(root)
    return bool(states(root)) or any(_complete(root / n) for n in _LEGACY)


def _tidy(root: Path) -> None:
    """Main process: turn an older layout (real `last` / `best` folders, states left between
    its two renames) into step-* folders, and remove hidden temporaries."""
    for name in _LEGACY:
        p = root / name
        if p.is_symlink() or not p.is_dir():
            continue
        try:
            dest = root / STEP.format(int(read_meta(p)["step"]))
        except (CheckpointError, ValueError):
            dest = None  # never finished
        if name.startswith(".old-") and (root / name[5:]).exists():
            dest = None  # the swap finished; this is the replaced copy
        if dest is None or dest.exists():
            _remove(p)
        else:
            os.replace(p, dest)
    for p in root.iterdir():
        if p.name.startswith((".tmp-", ".del-")) and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".") and p.name.endswith(".new"):
            p.unlink()


def _prune(root: Path, keep: int, protect: set[str]) -> None:
    """Keep the newest `keep` states and the protected ones (last, best, the best step)."""
    for p in states(root)[keep:]:
        if p.name not in protect:
            _remove(p)


def _protected(root: Path, meta: dict) -> set[str]:
    names = {_target(root / "last"), _target(root / "best")}
    if int(meta.get("best_step", -1)) >= 0:
        names.add(STEP.format(int(meta["best_step"])))
    return {n for n in names if n}


# ----------------------------------------------------------------------------- collectives
def _any_rank(accelerator, flag: bool) -> bool:
    return bool(agree(accelerator, flag)[0])


# ----------------------------------------------------------------------------- saving
def save_last(
    accelerator,
    root: Path,
    meta: dict[str, Any],
    *,
    keep_last: int,
    extra: dict | None = None,
    best: bool = False,
) -> Path:
    """Save the full training state as `root/step-<meta step>` and point `last` (and `best`
    when `best`) at it; keeps the newest `keep_last` states plus the best one. Collective: call
    on all ranks. `extra`: {file name: state dict} written as safetensors beside (the EMA).
    Raises CheckpointError (on every rank) when the state cannot be written: the partial
    folder is removed and the previous states are untouched."""
    root = Path(root)
    name = STEP.format(int(meta["step"]))
    meta = {**meta, "histodist_version": version_string()}
    same = accelerator.is_main_process and _target(root / "last") == name
    if broadcast(accelerator, same and _complete(root / name)):
        # Nothing trained since `last` was written at this step: only its metadata changes.
        if accelerator.is_main_process:
            _write_json(root / name / "meta.json", meta)
            if best:
                _point(root, "best", name)
        accelerator.wait_for_everyone()
        return root / "last"
    tmp = _write_state(accelerator, root, name, meta, keep_last, extra or {})
    if accelerator.is_main_process:
        os.replace(tmp, root / name)
        _fsync(root)
        if best:
            _point(root, "best", name)
        _point(root, "last", name)
        _prune(root, keep_last, _protected(root, meta))
    accelerator.wait_for_everyone()
    return root / "last"


def _write_state(accelerator, root: Path, name: str, meta: dict, keep_last: int, extra) -> Path:
    """Every rank writes the state into root/.tmp-<name>; the main process adds the extra
    files and meta.json and fsyncs them. Returns the folder, complete on disk."""
    tmp = root / f".tmp-{name}"
    problem = None
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        _tidy(root)
        protected = _protected(root, meta)
        if (root / name).exists() and name not in protected:
            _remove(root / name)  # a state of this step from before a resume: replaced
        _prune(root, max(1, keep_last - 1), protected)
        problem = _space_problem(root)
        if problem is None:
            tmp.mkdir()
    problem = broadcast(accelerator, problem)
    if problem:
        raise CheckpointError(problem)
    failure = None
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
    except (OSError, RuntimeError) as e:  # a full disk reaches torch.save as a RuntimeError
        failure = e
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and failure is None:
        try:
            for fname, sd in extra.items():
                save_weights(sd, tmp / fname)
            _write_json(tmp / "meta.json", meta)
            _fsync_tree(tmp)
        except OSError as e:
            failure = e
    if _any_rank(accelerator, failure is not None):
        message = _write_failure(accelerator, root, tmp, failure)
        raise CheckpointError(broadcast(accelerator, message))
    return tmp


def _space_problem(root: Path) -> str | None:
    """A message when the free space is below the size of the newest state (main process)."""
    prev = states(root)
    if not prev:
        return None
    need, free = _folder_bytes(prev[0]), shutil.disk_usage(root).free
    if free >= need:
        return None
    return _no_space(root, free, need, "not enough space")


def _no_space(root: Path, free: int, need: int, cause: str) -> str:
    return (
        f"{root}: cannot write a checkpoint ({cause}): {free / 2**20:.0f} MiB free, about "
        f"{need / 2**20:.0f} MiB needed; free space (or lower --keep-last) and rerun with "
        "--resume (the previous checkpoint is intact)"
    )


def _write_failure(accelerator, root: Path, tmp: Path, failure: BaseException | None) -> str:
    """Remove the partial state (main process) and describe the failure."""
    if not accelerator.is_main_process:
        return ""
    written = _folder_bytes(tmp) if tmp.is_dir() else 0
    shutil.rmtree(tmp, ignore_errors=True)
    prev = states(root)
    need = max(written, _folder_bytes(prev[0]) if prev else 0)
    if failure is None:
        cause = "failed on another rank"
    elif isinstance(failure, OSError) and failure.errno == errno.ENOSPC:
        cause = "no space left on device"
    else:
        cause = f"{type(failure).__name__}: {str(failure).strip().splitlines()[0][:120]}"
    return _no_space(root, shutil.disk_usage(root).free, need, cause)


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Weights alone as safetensors, atomically (temp + rename)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(tmp))


# ----------------------------------------------------------------------------- resuming
def resume(accelerator, root: Path, extra: dict | None = None, say=print) -> dict | None:
    """Load the newest loadable state under `root` on every rank (collective); returns its
    meta, or None when there is no state at all. The main process chooses the candidates and
    broadcasts them, so every rank loads the same folder. `extra`: {file name: module} whose
    weights are loaded from that safetensors file of the state (the EMA)."""
    root = Path(root)
    names = None
    if accelerator.is_main_process and root.is_dir():
        _tidy(root)
        names = [p.name for p in states(root)]
        _set_aside_pickles(root, names, say)
    names = broadcast(accelerator, names) or []
    for i, name in enumerate(names):
        error = _try_load(accelerator, root / name, extra or {})
        if _any_rank(accelerator, error is not None):
            say(f"{root / name}: cannot load ({error or 'failed on another rank'}); trying older")
            continue
        meta = read_meta(root / name)
        _say_rng_refused(accelerator, root / name, meta, say)
        if accelerator.is_main_process:
            _repair(root, name, names[:i], meta, say)
        accelerator.wait_for_everyone()
        if i:
            say(f"resuming from {root / name}, the newest state that loads")
        return meta
    if names:
        raise CheckpointError(f"{root}: no checkpoint loads ({', '.join(names)}); see above")
    return None


def _set_aside_pickles(root: Path, names: list[str], say) -> None:
    """Rename accelerate custom-object files (`custom_checkpoint_<i>.pkl`, which it unpickles
    with weights_only=False, and which states of an older layout hold for the EMA, saved as
    safetensors too) so that load_state neither reads them nor fails on their count."""
    for name in names:
        for f in (root / name).glob("custom_checkpoint_*.pkl"):
            os.replace(f, f.with_name(f.name + ".ignored"))
            say(f"{f}: not loaded (pickle); renamed {f.name}.ignored")


def _try_load(accelerator, folder: Path, extra: dict) -> str | None:
    """Load one state into the prepared objects; the reason it failed, or None."""
    from safetensors.torch import load_file

    try:
        read_meta(folder)
        # Accelerate reads model.safetensors with safetensors and optimizer, scheduler, scaler
        # and RNG files with torch.load(weights_only=True); custom objects (unpickled with
        # weights_only=False) are never registered, so none is read.
        accelerator.load_state(str(folder))
        for fname, module in extra.items():
            module.load_state_dict(load_file(str(folder / fname)))
    except Exception as e:  # noqa: BLE001 - any failure means: try an older state
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}" if str(e) else repr(e)
    return None


def _say_rng_refused(accelerator, folder: Path, meta: dict, say) -> None:
    """One line per rank whose random-state file of the loaded state was not restored:
    accelerate's load_state skips such a file (not a safe format, unreadable, missing) without
    a word, and the run then goes on with fresh random states (collective)."""
    from accelerate.utils import RNG_STATE_NAME, gather_object, load

    rank, note = accelerator.process_index, None
    path = folder / f"{RNG_STATE_NAME}_{rank}.pkl"
    # A rank beyond the saved world size (a resume at a new layout) has no file to restore.
    if path.exists() or rank < int(meta.get("world_size", 1)):
        try:
            # What load_state reads: torch.load(weights_only=True), numpy's types allowed.
            if "torch_manual_seed" not in load(path):
                raise ValueError("no torch random state in it")
        except Exception as e:  # noqa: BLE001 - any failure means: not restored
            why = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            note = (
                f"{path}: random states not restored ({type(e).__name__}: {why}); training "
                "goes on with fresh ones, so it is no longer bitwise reproducible"
            )
    for line in gather_object([note]):
        if line:
            say(line)


def _repair(root: Path, name: str, newer: list[str], meta: dict, say) -> None:
    """Point `last` at the loaded state, `best` at its best step; set newer states aside."""
    for n in newer:
        os.replace(root / n, root / f"unloadable-{n}")
        say(f"{root / n}: set aside as unloadable-{n}")
    if _target(root / "last") != name:
        _point(root, "last", name)
    best_step = int(meta.get("best_step", -1))
    best = STEP.format(best_step)
    if best_step >= 0 and _target(root / "best") != best:
        if _complete(root / best):
            _point(root, "best", best)
            say(f"{root / 'best'}: repaired, now {best} (the best step in {name}/meta.json)")
        else:
            say(f"warning: {root / best} (the best state) is missing; `best` is not updated")


# Settings that shape the saved state (tensor shapes, optimizer parameter groups, EMA
# weights) or what its position means; a resumed run must keep them. Anything else may change
# (epochs, lr and schedule, patience, checkpoint and log intervals, workers, precision, ...).
FIXED_ON_RESUME = (
    ("data", "dataset"),
    ("data", "num_classes"),
    ("data", "image_size"),
    ("data", "train_split"),
    ("model", "model"),
    ("model", "mil_dim"),
    ("optim", "optimizer"),
    ("optim", "layer_decay"),
    ("optim", "backbone_lr_scale"),
)


def resume_conflicts(run_dir: Path, cfg, manifest: dict) -> list[str]:
    """What `cfg` changes of the run's saved config.yaml (and the classes of its manifest.json)
    that its checkpoints cannot be resumed with, as "model.model resnet18 -> resnet34"."""
    from histodist.config import ConfigError, load_config

    try:
        saved = load_config(Path(run_dir) / "config.yaml").to_dict()
    except ConfigError as e:
        return [f"its config.yaml is unreadable ({e})"]
    new = cfg.to_dict()
    out = [
        f"{s}.{k} {saved[s][k]} -> {new[s][k]}"
        for s, k in FIXED_ON_RESUME
        if saved[s][k] != new[s][k]
    ]
    if (saved["optim"]["ema"] > 0) != (new["optim"]["ema"] > 0):
        out.append(f"optim.ema {saved['optim']['ema']} -> {new['optim']['ema']}")
    mpath = Path(run_dir) / "manifest.json"
    if mpath.is_file():
        changed = data_changes(json.loads(mpath.read_text()), manifest)
        if changed:
            out.append(f"the shards hold other data than {mpath} ({'; '.join(changed)})")
    return out


def data_changes(old: dict, new: dict) -> list[str]:
    """What differs between the manifest a run trained on and the shards' manifest now, in the
    data itself: classes, image size and normalisation, and per split the sample and class
    counts and the shards (names, sample counts, sha256). Provenance (command, creation time,
    version, source path) is not data: shards written again from the same images are equal."""
    out = [f"{k} {old.get(k)} -> {new.get(k)}" for k in ("classes", "image", "mean", "std")
           if old.get(k) != new.get(k)]  # fmt: skip
    before, after = old.get("splits") or {}, new.get("splits") or {}
    for split in sorted(set(before) | set(after)):
        a, b = before.get(split), after.get(split)
        if a is None or b is None:
            out.append(f"split {split} {'added' if a is None else 'removed'}")
            continue
        out += [f"splits.{split}.{k} {a.get(k)} -> {b.get(k)}"
                for k in ("num_samples", "class_counts") if a.get(k) != b.get(k)]  # fmt: skip
        shards_a, shards_b = (
            {e.get("name"): (e.get("num_samples"), e.get("sha256")) for e in x.get("shards", [])}
            for x in (a, b)
        )
        common = set(shards_a) & set(shards_b)
        for what, names in (
            ("removed", set(shards_a) - common),
            ("added", set(shards_b) - common),
            ("with other contents", {n for n in common if shards_a[n] != shards_b[n]}),
        ):
            if names:
                out.append(f"{split} shards {what}: {_some(sorted(names))}")
    return out


def _some(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


# ----------------------------------------------------------------------------- reading
def read_meta(ckpt: str | os.PathLike) -> dict:
    path = Path(ckpt) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint metadata ({e})") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointError(f"{path}: not checkpoint metadata (no 'step')")
    return meta


def _newest(root: Path) -> Path | None:
    """The newest complete state (`last` points there once its publication finished)."""
    found = states(root)
    if found:
        return root / "last" if _target(root / "last") == found[0].name else found[0]
    return root / "last" if _complete(root / "last") else None


def find_checkpoint(run_dir: str | os.PathLike, which: str = "best") -> Path:
    """A checkpoint folder of a run: `best` (the state of the best step recorded in the
    newest meta.json), `last`, another name under checkpoints/, or a checkpoint folder."""
    run_dir = Path(run_dir)
    if (run_dir / "meta.json").is_file():
        return run_dir
    root = run_dir / "checkpoints"
    newest = _newest(root)
    if which == "last" and newest is not None:
        return newest
    if which == "best":
        return _find_best(root, newest)
    if which not in ("best", "last") and _complete(root / which):
        return root / which
    raise CheckpointError(f"{run_dir}: no checkpoints/{which} with meta.json; is it a run folder?")


def _find_best(root: Path, newest: Path | None) -> Path:
    best_step = int(read_meta(newest).get("best_step", -1)) if newest else -1
    if best_step < 0:
        if _complete(root / "best"):
            return root / "best"
        if newest is None:
            raise CheckpointError(f"{root.parent}: no checkpoints; is it a run folder?")
        print(f"note: {root}: no validation finished yet; using last", file=sys.stderr)
        return newest
    for cand in (root / STEP.format(best_step), root / "best"):
        if _complete(cand) and int(read_meta(cand)["step"]) == best_step:
            return cand
    raise CheckpointError(
        f"{root}: the best state (step {best_step}, per {newest.name}/meta.json) is missing; "
        "pass --checkpoint last or a step-* folder"
    )


def load_run_model(run_dir: str | os.PathLike, which: str = "best"):
    """(model in eval mode on CPU, Config, meta) from a run folder written by histodist.train.
    Uses the EMA weights when the run kept an EMA (meta["eval_weights"])."""
    from histodist.config import load_config, replace
    from histodist.models import WeightsError, build_model, read_state_dict

    run_dir = Path(run_dir)
    ckpt = find_checkpoint(run_dir, which)
    rd = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else run_dir
    cfg = load_config(rd / "config.yaml")
    meta = read_meta(ckpt)
    cfg = replace(cfg, model={"pretrained": False, "weights": None})
    model = build_model(cfg.model, num_classes=meta["num_classes"], image_size=meta["image_size"])
    try:
        sd = read_state_dict(ckpt / meta.get("eval_weights", "model.safetensors"))
    except WeightsError as e:
        raise CheckpointError(str(e)) from None
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt}: weights do not fit {cfg.model.model} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval(), cfg, meta
