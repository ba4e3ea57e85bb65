"""A tiny trained run folder for the evaluate / predict / explain / export tests.

    run_dir = make_run(tmp / "runs" / "tiny", shards_dir)

Trains histodist's `small-cnn` at 32 px for a few steps on the shards' train split (real PCam
patches written by shardkit) and writes the run folder of docs/architecture.md: config.yaml,
manifest.json and checkpoints/best/{model.safetensors, meta.json}. Built here rather than by
`histodist.train` so these tests depend only on the run-folder contract.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

IMAGE_SIZE = 32


def make_run(
    run_dir: Path, shards: Path, *, steps: int = 30, seed: int = 0, crop: float = 1.0
) -> Path:
    from histodist.augment import eval_transform
    from histodist.config import from_dict, save_config
    from histodist.data.loader import eval_loader
    from histodist.models import build_model
    from histodist.training.checkpoint import save_weights

    run_dir = Path(run_dir)
    if (run_dir / "checkpoints" / "best" / "meta.json").is_file():
        return run_dir  # shared by the test modules of one pytest run
    cfg = from_dict({
        "data": {"shards": str(shards), "image_size": IMAGE_SIZE, "workers": 0},
        "augment": {"crop": crop},
        "model": {"model": "small-cnn"},
        "optim": {"batch_size": 16},
        "log": {"wandb": "disabled"},
    })  # fmt: skip
    manifest = json.loads((shards / "manifest.json").read_text())
    torch.manual_seed(seed)
    model = build_model(cfg.model, num_classes=2, image_size=IMAGE_SIZE)
    tf = eval_transform(out_size=IMAGE_SIZE, mean=manifest["mean"], std=manifest["std"],
                        crop=crop)  # fmt: skip
    batches = list(eval_loader(str(shards), "train", batch_size=16, rank=0, world_size=1,
                               workers=0))  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        b = batches[step % len(batches)]
        loss = torch.nn.functional.cross_entropy(model(tf(b["image"])), b["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = run_dir / "checkpoints" / "best"
    ckpt.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    shutil.copy(shards / "manifest.json", run_dir / "manifest.json")
    save_weights(model.state_dict(), ckpt / "model.safetensors")
    meta = {"epoch": 1, "step": steps, "metric": "auc", "value": 0.0, "num_classes": 2,
            "image_size": IMAGE_SIZE}  # fmt: skip
    (ckpt / "meta.json").write_text(json.dumps(meta))
    return run_dir


def tiny_run(pcam_jpeg: Path, base: Path) -> tuple[Path, Path]:
    """(run folder, shards) shared by the test modules of one pytest run: real PCam patches in
    shards of 7 (train 24 + 24, valid 10 + 10, test 8 + 8 taken from pcam-jpeg's train)."""
    from shardkit import pcam_images, write_shards

    shards = base / "tiny-shards"
    if not (shards / "manifest.json").is_file():
        more = pcam_images(pcam_jpeg, "train", 32)
        images = {"train": pcam_images(pcam_jpeg, "train", 24),
                  "valid": pcam_images(pcam_jpeg, "valid", 10),
                  "test": more[24:32] + more[56:64]}  # fmt: skip
        write_shards(shards, images, 7)
    return make_run(base / "runs" / "tiny", shards), shards


def untrained_run(run_dir: Path, classes: list[str], *, seed: int = 0) -> Path:
    """A run folder holding a freshly initialised small-cnn for `classes` (e.g. 7 HAM10000
    classes), normalised with ImageNet-like stats: for tests of the multi-class paths."""
    from histodist.config import from_dict, save_config
    from histodist.models import build_model
    from histodist.training.checkpoint import save_weights

    cfg = from_dict({
        "data": {"shards": str(run_dir / "no-shards"), "image_size": IMAGE_SIZE, "workers": 0,
                 "num_classes": len(classes)},
        "model": {"model": "small-cnn"},
        "log": {"wandb": "disabled"},
    })  # fmt: skip
    torch.manual_seed(seed)
    model = build_model(cfg.model, num_classes=len(classes), image_size=IMAGE_SIZE)
    ckpt = Path(run_dir) / "checkpoints" / "best"
    ckpt.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    manifest = {"format": "histodist-shards/1", "classes": classes, "image": None,
                "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "splits": {}}  # fmt: skip
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    save_weights(model.state_dict(), ckpt / "model.safetensors")
    meta = {"epoch": 0, "step": 0, "num_classes": len(classes), "image_size": IMAGE_SIZE,
            "classes": classes}  # fmt: skip
    (ckpt / "meta.json").write_text(json.dumps(meta))
    return run_dir
