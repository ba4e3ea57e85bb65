"""Build a training session from a Config: Accelerator, run folder, loaders, model, optimizer.

Each builder is small and called once by histodist.train.run(); nothing here trains.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from histodist import augment as aug
from histodist import data
from histodist.config import Config, ConfigError, replace, save_config
from histodist.loop import Parts, State
from histodist.models import build_model, model_norm, set_backbone_trainable
from histodist.optim import build_optimizer, build_scheduler, scaled_lr
from histodist.tracking import RunLog, resolve_wandb_mode, wandb_available, wandb_init_kwargs


class TrainError(RuntimeError):
    """A run that cannot start (existing run folder, missing split, ...); message says the fix."""


def resolve_precision(cfg: Config):
    """`--precision auto` resolved for this process's device (histodist.precision): the config
    with the chosen precision, and the Choice (precision and why)."""
    from accelerate import PartialState

    from histodist.precision import resolve

    choice = resolve(cfg.train.precision, PartialState().device)
    return replace(cfg, train={"precision": choice.precision}), choice


def make_accelerator(cfg: Config):
    """The only Accelerator: precision (already resolved, see resolve_precision), W&B (main
    process only), DDP options. Returns (accelerator, use_wandb, message or None)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    mode, msg = resolve_wandb_mode(cfg.log.wandb)
    if mode != "disabled" and not wandb_available():
        mode, msg = "disabled", "wandb: not installed, W&B logging off (pip install wandb)"
    # Frozen backbone parameters produce no gradients; DDP must be told to expect that.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.model.freeze_epochs > 0)
    acc = Accelerator(
        mixed_precision=cfg.train.precision,
        log_with="wandb" if mode != "disabled" else None,
        step_scheduler_with_optimizer=False,  # our scheduler counts optimizer steps itself
        kwargs_handlers=[ddp],
    )
    return acc, mode, msg


def complete_config(cfg: Config, manifest: dict) -> Config:
    """Fill num_classes / image_size left at 0 from the manifest; check they agree with it."""
    n = len(manifest["classes"])
    if cfg.data.num_classes and cfg.data.num_classes != n:
        raise ConfigError(
            f"--num-classes {cfg.data.num_classes}: the shards at {cfg.data.shards} have {n} "
            f"classes {manifest['classes']}; pass --num-classes {n} or other --shards"
        )
    size = cfg.data.image_size or (manifest.get("image") or {}).get("height") or 224
    for split in (cfg.data.train_split, cfg.data.valid_split):
        if split not in manifest.get("splits", {}):
            have = ", ".join(manifest.get("splits", {}))
            raise TrainError(
                f"{cfg.data.shards}: no split {split!r} (splits: {have}); "
                "pass --train-split / --valid-split"
            )
    return replace(cfg, data={"num_classes": n, "image_size": size})


def run_dir_for(cfg: Config) -> Path:
    name = cfg.train.run_name or f"{cfg.data.dataset}-{cfg.model.model.replace('+', '_')}"
    return Path(cfg.train.runs_dir) / name


def prepare_run_dir(acc, cfg: Config, manifest: dict, note: str | None = None) -> Path:
    """Create runs/<name>/ with config.yaml (`note` as its leading comment) and manifest.json;
    refuse to overwrite a run that holds a checkpoint unless --resume."""
    run_dir = run_dir_for(cfg)
    if (run_dir / "checkpoints" / "last").is_dir() and not cfg.train.resume:
        raise TrainError(
            f"{run_dir}: already holds a checkpoint; pass --resume to continue it "
            "or --run-name NEW for a new run"
        )
    if acc.is_main_process:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml", note=note)
        tmp = run_dir / ".manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.replace(run_dir / "manifest.json")
    acc.wait_for_everyone()
    return run_dir


def loaders(acc, cfg: Config, manifest: dict):
    d = cfg.data
    # Resize in the workers only when the shards' images vary in size (so they can be batched).
    size = None if manifest.get("image") else (d.image_size, d.image_size)
    common = dict(
        rank=acc.process_index,
        world_size=acc.num_processes,
        workers=d.workers,
        image_size=size,
        skip_bad_shards=d.skip_bad_shards,
        cache_dir=d.cache_dir,
    )
    train = data.train_loader(
        d.shards,
        d.train_split,
        batch_size=cfg.optim.batch_size,
        seed=cfg.train.seed,
        shuffle_buffer=d.shuffle_buffer,
        resample=d.resample,
        **common,
    )
    valid = data.eval_loader(d.shards, d.valid_split, batch_size=cfg.optim.batch_size, **common)
    return train, valid


def class_weights(manifest: dict, split: str, n: int) -> torch.Tensor:
    """Inverse-frequency class weights N / (C * n_c), float32 (C,); absent classes get 0."""
    counts = torch.tensor(manifest["splits"][split]["class_counts"], dtype=torch.float32)
    w = counts.sum() / (n * counts.clamp(min=1))
    return torch.where(counts > 0, w, torch.zeros_like(w))


def build_parts(acc, cfg: Config, manifest: dict, run_dir: Path, mode: str) -> Parts:
    """Model, optimizer, schedule, augmentation, loss and loaders, prepared by Accelerate."""
    n_cls, size, crop = cfg.data.num_classes, cfg.data.image_size, cfg.augment.crop
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts)
    model = build_model(cfg.model, num_classes=n_cls, image_size=size)
    mean, std = _norm(cfg, manifest, model)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_dl, valid_dl = loaders(acc, cfg, manifest)
    # The scaled peak lr goes to the optimizer only: the saved config keeps what the user asked.
    optimizer = build_optimizer(
        model, dataclasses.replace(cfg.optim, lr=scaled_lr(cfg.optim, acc.num_processes))
    )
    per_epoch = math.ceil(len(train_dl) / cfg.optim.accum_steps)
    scheduler = build_scheduler(
        optimizer,
        cfg.optim,
        total_steps=cfg.train.epochs * per_epoch,
        warmup_steps=round(cfg.optim.warmup_epochs * per_epoch),
    )
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    ema = _ema(acc, model, cfg)
    weights = class_weights(manifest, cfg.data.train_split, n_cls).to(acc.device)
    criterion = nn.CrossEntropyLoss(
        weight=weights if cfg.data.class_balance == "loss" else None,
        label_smoothing=cfg.optim.label_smoothing,
    )
    if mode != "disabled":
        acc.init_trackers(
            cfg.log.project,
            config=cfg.to_dict(),
            init_kwargs=wandb_init_kwargs(run_dir, run_dir.name, mode, cfg.log.entity)
            if acc.is_main_process
            else {},
        )
    return Parts(
        accelerator=acc,
        cfg=cfg,
        model=model,
        forward=torch.compile(model) if cfg.model.compile else model,
        optimizer=optimizer,
        scheduler=scheduler,
        augment=aug.build(cfg.augment.augment, out_size=size, mean=mean, std=std, crop=crop),
        eval_transform=aug.eval_transform(out_size=size, mean=mean, std=std, crop=crop),
        criterion=criterion,
        train_loader=train_dl,
        valid_loader=valid_dl,
        log=RunLog(acc, run_dir, use_wandb=mode != "disabled"),
        run_dir=run_dir,
        meta=_meta(cfg, manifest, mean, std, ema is not None),
        ema=ema,
        sample_weights=weights if cfg.data.class_balance == "sampler" else None,
        valid_size=int(manifest["splits"][cfg.data.valid_split]["num_samples"]),
    )


def _norm(cfg: Config, manifest: dict, model: nn.Module):
    if cfg.augment.normalize == "model" or "mean" not in manifest:
        return model_norm(model)
    return tuple(manifest["mean"]), tuple(manifest["std"])


def _ema(acc, model: nn.Module, cfg: Config):
    if cfg.optim.ema <= 0:
        return None
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(acc.unwrap_model(model), decay=cfg.optim.ema)
    acc.register_for_checkpointing(ema)
    return ema


def _meta(cfg: Config, manifest: dict, mean, std, has_ema: bool) -> dict:
    blob = json.dumps(manifest, sort_keys=True).encode()
    return {
        "num_classes": cfg.data.num_classes,
        "image_size": cfg.data.image_size,
        "classes": list(manifest["classes"]),
        "mean": list(mean),
        "std": list(std),
        "config_sha256": cfg.sha256(),
        "manifest_sha256": hashlib.sha256(blob).hexdigest(),
        "eval_weights": "model_ema.safetensors" if has_ema else "model.safetensors",
    }


def resume_state(p: Parts) -> State:
    """Load checkpoints/last when --resume and it exists; else a fresh State."""
    last = p.run_dir / "checkpoints" / "last"
    if not (p.cfg.train.resume and (last / "meta.json").is_file()):
        return State()
    from histodist.checkpoint import read_meta

    p.accelerator.load_state(str(last))
    meta = read_meta(last)
    if meta.get("world_size") != p.accelerator.num_processes:
        p.log.print(
            f"warning: resuming a {meta.get('world_size')}-process run with "
            f"{p.accelerator.num_processes}: the data order differs from an uninterrupted run"
        )
    st = State.from_meta(meta)
    p.log.print(
        f"resumed {last} at epoch {st.epoch + 1}, batch {st.batch_in_epoch}, step {st.step}"
    )
    return st


def apply_freeze(p: Parts, epoch: int) -> None:
    """Backbone frozen for the first --freeze-epochs epochs, trainable afterwards."""
    if p.cfg.model.freeze_epochs:
        frozen = epoch < p.cfg.model.freeze_epochs
        set_backbone_trainable(p.accelerator.unwrap_model(p.model), not frozen)
