"""Batched inference shared by evaluate, predict and explain: one trained run, many inputs.

    run = load_run("runs/pcam-resnet18", "best")
    loader = shard_batches(run, shards, "valid", ...) or file_batches(run, list_inputs([...]))
    preds = collect(iter_predictions(run, loader, device="cuda", tta=8))

Inputs are uint8 batches (`histodist.data.loader.Batch`, plus "ok"/"error" for image files);
preprocessing is the run's own: resize/centre-crop to the training input size and the
normalisation the run trained with (`histodist.augment.eval_transform`), on the device.
Test-time augmentation averages the softmax over dihedral transforms of each image.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from histodist.config import WANDB_MODES
from histodist.errors import HistodistError, UsageError, integer
from histodist.fileio import IMAGE_EXTENSIONS, atomic_path
from histodist.metrics import predicted_class

IMAGE_SUFFIXES = (*IMAGE_EXTENSIONS, ".npy")  # image files, and uint8 arrays saved by np.save
# Dihedral indices (histodist.augment.dihedral: k % 4 quarter turns, k >= 4 adds a flip) used
# for each TTA size: 2 = identity + mirror, 4 = the four rotations, 8 = the whole group.
TTA_KS = {1: (0,), 2: (0, 4), 4: (0, 1, 2, 3), 8: tuple(range(8))}


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def add_run_flags(parser, *, device: bool = False, wandb: bool = False) -> None:
    """The options every command on a run folder shares: --run and --checkpoint. With `device`
    also --device, with `wandb` also --wandb (default: the run's mode)."""
    parser.add_argument("--run", required=True, help="run folder written by histodist.train")
    parser.add_argument("--checkpoint", default="best", help="best, last or a checkpoint folder")
    if device:
        parser.add_argument("--device", help="cuda, cpu, ... (default: cuda when present)")
    if wandb:
        parser.add_argument("--wandb", choices=WANDB_MODES, help="W&B mode (default: the run's)")


def add_batch_flags(parser, batch_size: int | None, batch_help: str) -> None:
    """The options every command that runs the model over images shares: --precision,
    --batch-size, --workers, --no-progress."""
    add_precision_flag(parser)
    parser.add_argument("--batch-size", type=integer(1), default=batch_size, help=batch_help)
    parser.add_argument("--workers", type=integer(0), default=2, help="decode worker processes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_precision_flag(parser) -> None:
    """--precision for the inference commands (histodist.precision's rule, as in training)."""
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="auto",
        help="autocast for the forward passes; auto = as training: bf16 on CUDA >= 8.0 and "
        "CPUs with native bf16, fp16 on older CUDA, else fp32 (fp32 forces full precision)",
    )  # fmt: skip


def autocast_for(requested: str, device) -> tuple[Callable | None, object]:
    """(a context-manager factory for iter_predictions' `autocast`, or None for fp32; the
    histodist.precision.Choice made, with its reason)."""
    from histodist.precision import autocast_dtype, resolve

    device = torch.device(device)
    choice = resolve(requested, device)
    dtype = autocast_dtype(choice.precision)
    if dtype is None:
        return None, choice
    return (lambda: torch.autocast(device.type, dtype=dtype)), choice


class InputError(HistodistError, ValueError):
    """An input path or CSV that cannot be used; the message names it and the fix. (A --run
    that is no run folder is a UsageError, exit 2.)"""


# -- the run --------------------------------------------------------------------------------


@dataclass
class Run:
    """A trained model with what it needs to preprocess inputs as in training."""

    model: torch.nn.Module  # eval mode
    cfg: object  # histodist.config.Config
    meta: dict  # checkpoint meta.json
    manifest: dict  # the shards' manifest the run trained on
    run_dir: Path
    classes: list[str]
    image_size: int  # model input side in pixels
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def is_bags(self) -> bool:
        """A MIL head: its inputs are slide bags (histodist.data.bags), one per batch."""
        from histodist.mil import MIL_HEADS

        return self.cfg.model.model in MIL_HEADS

    @property
    def crop(self) -> float:
        """Centre-crop fraction the run trained and validated with (1.0: none)."""
        return float(self.cfg.augment.crop)

    def transform(self):
        """uint8 (B,C,H,W) -> the model's normalised input, exactly as in validation."""
        from histodist.augment import eval_transform

        if self.manifest.get("embedding"):  # a head on embedding vectors: no image transform
            from histodist.data.embeddings import identity

            return identity
        return eval_transform(out_size=self.image_size, mean=self.mean, std=self.std,
                              crop=self.crop)  # fmt: skip

    @property
    def load_size(self) -> tuple[int, int]:
        """Size images are decoded to so they batch: the shards' common size, else the input."""
        img = self.manifest.get("image") or {}
        if img.get("height") and img.get("width"):
            return int(img["height"]), int(img["width"])
        return self.image_size, self.image_size


def load_run(run_dir: str | os.PathLike, which: str = "best") -> Run:
    """Load a run folder's model (``which`` = best | last | a checkpoint folder) on the CPU."""
    from histodist.models import model_norm
    from histodist.training.checkpoint import load_run_model

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():  # the --run value is wrong: a usage error
        raise UsageError(f"{run_dir}: not a run folder (no config.yaml); pass --run runs/NAME")
    # --checkpoint PATH names a checkpoint folder; best / last are looked up in the run
    model, cfg, meta = load_run_model(which if Path(which).is_dir() else run_dir, which)
    model.eval()
    mpath = run_dir / "manifest.json"
    manifest = json.loads(mpath.read_text()) if mpath.is_file() else {}
    classes = [str(c) for c in meta.get("classes") or manifest.get("classes")
               or range(cfg.data.num_classes)]  # fmt: skip
    size = int(meta.get("image_size") or cfg.data.image_size)
    if meta.get("mean") and meta.get("std"):  # what training normalised with, recorded
        mean, std = tuple(meta["mean"]), tuple(meta["std"])
    elif cfg.augment.normalize == "model" or not manifest.get("mean"):
        mean, std = model_norm(model)
    else:
        mean, std = tuple(manifest["mean"]), tuple(manifest["std"])
    return Run(model, cfg, meta, manifest, run_dir, classes, size, mean, std)


# -- model outputs --------------------------------------------------------------------------


def logits_to_probs(logits: torch.Tensor) -> torch.Tensor:
    """(B, C) logits -> (B, C) float32 probabilities; a single logit is P(class 1)."""
    logits = logits.float()
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], 1)
    return logits.softmax(1)


@torch.no_grad()
def tta_probs(model: torch.nn.Module, x: torch.Tensor, tta: int = 1) -> torch.Tensor:
    """Mean softmax over ``tta`` dihedral transforms of a normalised float batch (B, 3, H, W).

    Returns float32 (B, C) on x's device. ``tta`` is 1, 2, 4 or 8.
    """
    from histodist.augment import dihedral

    if tta not in TTA_KS:
        raise InputError(f"--tta {tta}: choose 1, 2, 4 or 8")
    ks = TTA_KS[tta]
    total = sum(logits_to_probs(model(dihedral(x, k) if k else x)) for k in ks)
    return total / len(ks)


def iter_predictions(
    run: Run,
    batches: Iterable[dict],
    *,
    device: torch.device | str = "cpu",
    tta: int = 1,
    keep_images: bool = False,
    progress: bool = False,
    total: int | None = None,
    autocast=None,
) -> Iterator[dict]:
    """Run the model over uint8 batches; yields per batch, on the CPU:
    {"key": [str], "label": int64 (B,), "group": [str|None], "probs": float32 (B, C)
    (NaN rows for unreadable files), "image": uint8 (B,3,H,W) if keep_images}.
    ``autocast``: a context manager factory (e.g. accelerator.autocast) for mixed precision.
    """
    from tqdm.auto import tqdm

    if run.is_bags and tta != 1:
        raise UsageError(f"--tta {tta}: a slide's bag of embeddings has no dihedral views")
    transform = run.transform()
    model = run.model.to(device).eval()
    for batch in tqdm(batches, total=total, disable=not progress, unit="batch", leave=False):
        x = transform(batch["image"].to(device, non_blocking=True))
        if autocast is None:
            probs = tta_probs(model, x, tta)
        else:
            with autocast():
                probs = tta_probs(model, x, tta)
        probs = probs.float().cpu()
        ok = batch.get("ok")
        if ok is not None:
            probs[~ok] = float("nan")
        out = {k: batch[k] for k in ("key", "label", "group", "path", "error") if k in batch}
        out["probs"] = probs
        if keep_images:
            out["image"] = batch["image"].cpu()
        yield out


@dataclass
class Predictions:
    """Predictions over a whole input set, CPU numpy."""

    keys: list[str]
    labels: np.ndarray  # int64 (N,), -1 where unknown
    groups: list[str | None]
    probs: np.ndarray  # float64 (N, C), NaN rows for unreadable inputs
    paths: list[str | None] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # key -> why it could not be read

    def __len__(self) -> int:
        return len(self.keys)

    def sorted(self) -> Predictions:
        """Rows ordered by key: the same order whatever the number of processes, so seeded
        bootstrap intervals do not depend on it."""
        order = sorted(range(len(self.keys)), key=self.keys.__getitem__)
        return Predictions(
            [self.keys[i] for i in order],
            self.labels[order],
            [self.groups[i] for i in order],
            self.probs[order],
            [self.paths[i] for i in order] if self.paths else [],
            self.errors,
        )

    @property
    def valid(self) -> np.ndarray:
        """Rows with a label and a prediction (what the metrics use)."""
        return (self.labels >= 0) & ~np.isnan(self.probs).any(1)


def collect(results: Iterable[dict], num_classes: int) -> Predictions:
    """Concatenate ``iter_predictions`` output into one Predictions."""
    keys, labels, groups, probs, paths, errors = [], [], [], [], [], {}
    for r in results:
        n = len(r["key"])
        keys += r["key"]
        labels.append(np.asarray(r["label"]))
        groups += list(r.get("group") or [None] * n)
        probs.append(r["probs"].double().numpy())
        paths += list(r.get("path") or [None] * n)
        for k, e in zip(r["key"], r.get("error") or [None] * n, strict=True):
            if e:
                errors[k] = e
    return Predictions(
        keys,
        np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64),
        groups,
        np.concatenate(probs) if probs else np.zeros((0, num_classes)),
        paths,
        errors,
    )


def gather(accelerator, preds: Predictions) -> Predictions:
    """All ranks' predictions, concatenated in rank order, on every rank (exactly once each:
    the loaders split the inputs disjointly)."""
    if accelerator is None or accelerator.num_processes == 1:
        return preds
    from accelerate.utils import gather_object

    parts = gather_object([preds])  # small (keys + C floats per sample): pickled lists suffice
    return Predictions(
        [k for p in parts for k in p.keys],
        np.concatenate([p.labels for p in parts]),
        [g for p in parts for g in p.groups],
        np.concatenate([p.probs for p in parts]),
        [q for p in parts for q in p.paths],
        {k: v for p in parts for k, v in p.errors.items()},
    )


# -- inputs -----------------------------------------------------------------------------------


def shard_batches(run: Run, shards: str, split: str, *, batch_size: int, rank: int = 0,
                  world_size: int = 1, workers: int = 2) -> Iterable[dict]:  # fmt: skip
    """The run's evaluation loader over ``shards``/``split`` for one rank: images or
    embeddings, or for a MIL head every slide's bag once (one per batch)."""
    from histodist.data.embeddings import check_compatible
    from histodist.data.loader import eval_loader, load_manifest

    manifest = load_manifest(shards)
    check_compatible(run.manifest, manifest, shards)
    if run.is_bags:
        from histodist.data.bags import bag_loader

        return bag_loader(shards, split, train=False, rank=rank, world_size=world_size,
                          workers=workers, cache_dir=run.cfg.data.cache_dir, manifest=manifest)  # fmt: skip
    img = run.manifest.get("image") or {}
    size = None if img.get("height") else run.load_size  # varying sizes: resize to batch
    return eval_loader(
        shards, split, batch_size=batch_size, rank=rank, world_size=world_size,
        workers=workers, image_size=size, cache_dir=run.cfg.data.cache_dir,
    )  # fmt: skip


@dataclass
class InputItem:
    key: str
    path: str
    label: int = -1
    group: str | None = None


def _label_index(value: str, classes: Sequence[str], where: str) -> int:
    value = str(value).strip()
    if value == "":
        return -1
    if value in classes:
        return list(classes).index(value)
    raise InputError(f"{where}: label {value!r} is not one of the run's classes {list(classes)}")


def _from_csv(path: Path, classes: Sequence[str], image_dir: str | None) -> list[InputItem]:
    """CSV with a ``path`` (relative to the CSV) or ``id`` column and optional ``label``/``group``.
    Ids are looked up as ``<image_dir>/<id>.<any image suffix>`` (default: the CSV's folder,
    then its ``train/`` and ``test/`` subfolders, the Kaggle layout)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    cols = set(rows[0]) if rows else set()
    if not cols & {"path", "id"}:
        raise InputError(f"{path}: needs a 'path' or 'id' column (has {sorted(cols)})")
    roots = [Path(image_dir)] if image_dir else [path.parent, path.parent / "train",
                                                  path.parent / "test"]  # fmt: skip
    items = []
    for i, row in enumerate(rows, start=2):
        if row.get("path"):
            p = Path(row["path"])
            p = p if p.is_absolute() else path.parent / p
        else:
            cands = [r / f"{row['id']}{s}" for r in roots for s in IMAGE_SUFFIXES]
            p = next((c for c in cands if c.exists()), roots[0] / f"{row['id']}.tif")
        label = _label_index(row.get("label", ""), classes, f"{path}:{i}")
        items.append(InputItem(row.get("id") or p.stem, str(p), label, row.get("group") or None))
    return items


def _from_dir(root: Path, classes: Sequence[str]) -> list[InputItem]:
    """Class subfolders named after the run's classes give labels; otherwise every image
    file below ``root`` is unlabelled."""
    subs = [d for d in sorted(root.iterdir()) if d.is_dir()]
    if subs and all(d.name in classes for d in subs):
        return [InputItem(p.stem, str(p), list(classes).index(d.name))
                for d in subs for p in sorted(d.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]  # fmt: skip
    return [InputItem(p.stem, str(p)) for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]  # fmt: skip


def list_inputs(
    inputs: Sequence[str], classes: Sequence[str], *, image_dir: str | None = None
) -> list[InputItem]:
    """Image files from folders (labelled by class subfolders), CSVs and single files.

    Keys are file stems (the Kaggle ids); when stems repeat, the paths keep keys unique.
    """
    items: list[InputItem] = []
    for spec in inputs:
        p = Path(spec)
        if p.is_dir():
            items += _from_dir(p, classes)
        elif p.suffix.lower() == ".csv":
            items += _from_csv(p, classes, image_dir)
        elif p.exists() or p.suffix.lower() in IMAGE_SUFFIXES:
            items.append(InputItem(p.stem, str(p)))  # a missing image is reported, not fatal
        else:
            raise InputError(f"{spec}: no such file or folder")
    if not items:
        raise InputError(f"no images found in {' '.join(inputs)}")
    if len({i.key for i in items}) < len(items):
        for i in items:
            i.key = i.path.replace(os.sep, "/")
    return items


class ImageFiles(torch.utils.data.Dataset):
    """Image files decoded as the shard loader decodes them; unreadable ones give a zero image
    and ``ok=False`` with the reason, so one bad file never stops a run."""

    def __init__(self, items: Sequence[InputItem], size: tuple[int, int]):
        self.items, self.size = list(items), size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        from histodist.data.loader import decode_sample

        it = self.items[i]
        ext = Path(it.path).suffix.lower().lstrip(".")
        sample = {"key": it.key, "label": it.label, "group": it.group, "path": it.path}
        try:
            raw = {"__key__": it.key, {"jpeg": "jpg", "tiff": "tif"}.get(ext, ext): Path(
                it.path).read_bytes()}  # fmt: skip
            image, error = decode_sample(raw, self.size)["image"], ""
        except Exception as exn:  # any decoder failure: record it and go on
            image = torch.zeros(3, *self.size, dtype=torch.uint8)
            error = f"{type(exn).__name__}: {str(exn).splitlines()[0] if str(exn) else ''}"
        return {**sample, "image": image, "ok": not error, "error": error}


def _collate(samples: list[dict]) -> dict:
    out = {k: [s[k] for s in samples] for k in ("key", "group", "path", "error")}
    out["image"] = torch.stack([s["image"] for s in samples])
    out["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.int64)
    out["ok"] = torch.tensor([s["ok"] for s in samples], dtype=torch.bool)
    return out


def file_batches(
    run: Run,
    items: Sequence[InputItem],
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 2,
) -> torch.utils.data.DataLoader:
    """Batches over this rank's share (items r::world) of image files."""
    if run.manifest.get("embedding"):
        raise InputError(
            f"{run.run_dir}: a head on {run.manifest['embedding']['model']} embeddings reads "
            "embedding shards only; embed the images with histodist.embed and pass those shards"
        )
    return torch.utils.data.DataLoader(
        ImageFiles(list(items)[rank::world_size], run.load_size),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=torch.cuda.is_available(),
    )


def warn_unreadable(preds: Predictions) -> None:
    """One warning listing every input that could not be read."""
    if preds.errors:
        lines = "\n".join(f"  {k}: {e}" for k, e in sorted(preds.errors.items()))
        warnings.warn(f"{len(preds.errors)} unreadable image(s), left without a prediction:\n"
                      f"{lines}", stacklevel=2)  # fmt: skip


# -- outputs ----------------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        write(f)
    return path


def _fmt(p: float) -> str:
    return "" if np.isnan(p) else f"{p:.6f}"


def write_predictions(path: str | os.PathLike, preds: Predictions, classes: Sequence[str]) -> Path:
    """CSV: key, label (class name or empty), prob_<class>..., pred, group[, path][, error]."""
    with_path = any(preds.paths)
    predicted = predicted_class(np.nan_to_num(preds.probs)).tolist() if len(preds.keys) else []

    def write(f):
        w = csv.writer(f)
        w.writerow(["key", "label", *[f"prob_{c}" for c in classes], "pred", "group"]
                   + (["path", "error"] if with_path else []))  # fmt: skip
        for i, key in enumerate(preds.keys):
            p, y = preds.probs[i], int(preds.labels[i])
            pred = "" if np.isnan(p).any() else classes[predicted[i]]
            row = [key, classes[y] if y >= 0 else "", *map(_fmt, p), pred, preds.groups[i] or ""]
            if with_path:
                row += [preds.paths[i] or "", preds.errors.get(key, "")]
            w.writerow(row)

    return atomic_write(path, write)


def write_submission(path: str | os.PathLike, preds: Predictions) -> Path:
    """Kaggle Histopathologic Cancer Detection submission: ``id,label`` with P(class 1)."""

    def write(f):
        w = csv.writer(f)
        w.writerow(["id", "label"])
        for key, p in zip(preds.keys, preds.probs, strict=True):
            w.writerow([key, _fmt(p[1])])

    return atomic_write(path, write)


def is_kaggle_test(inputs: Sequence[str]) -> bool:
    """True for the Kaggle HCD ``test/`` folder: one folder named test holding .tif files."""
    if len(inputs) != 1 or not Path(inputs[0]).is_dir():
        return False
    p = Path(inputs[0])
    return p.name == "test" and any(p.glob("*.tif"))
