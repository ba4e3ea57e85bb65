"""Build a training run from a Config: Accelerator, run folder, loaders, model, optimizer.

Each builder is small and called once by histodist.train.run(); nothing here trains.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from histodist import augment as aug
from histodist import hub
from histodist.config import Config, ConfigError, replace, save_config
from histodist.data import embeddings
from histodist.data import loader as data
from histodist.errors import UsageError
from histodist.fileio import atomic_write
from histodist.models import adapt, build_model, model_norm, set_backbone_trainable
from histodist.training import mil, runlock
from histodist.training.checkpoint import STEP
from histodist.training.loop import Parts, State
from histodist.training.optim import build_optimizer, build_scheduler, scaled_lr, schedule_length
from histodist.training.tracking import (
    RunLog,
    record_config,
    resolve_wandb_mode,
    sweep_run_id,
    wandb_available,
    wandb_init_kwargs,
)


class TrainError(UsageError, RuntimeError):
    """A run that cannot start (existing run folder, missing split, ...); message says the fix."""


def resolve_precision(cfg: Config):
    """`--precision auto` resolved for this process's device (histodist.precision): the config
    with the chosen precision, and the Choice (precision and why)."""
    from histodist.precision import resolve

    choice = resolve(cfg.train.precision, process_device())
    return replace(cfg, train={"precision": choice.precision}), choice


def process_device() -> torch.device:
    """The device the Accelerator will give this process, without creating accelerate's
    process state first: a PartialState made before the Accelerator ignores
    ACCELERATE_USE_CPU, and every process of a multi-process CPU launch then ran alone."""
    from accelerate.utils import parse_flag_from_env

    if torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def make_accelerator(cfg: Config):
    """The only Accelerator: precision (already resolved, see resolve_precision), W&B (main
    process only), DDP options. Returns (accelerator, W&B mode "online" | "offline" |
    "disabled", why offline or why off (a line to print), or None)."""
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
    if hub.is_hub(cfg.model.model):  # the model's own input size; images resized on the device
        size = hub.input_config(cfg.model.model, cfg.model.family)["input_size"]
    for split in (cfg.data.train_split, cfg.data.valid_split):
        if split not in manifest.get("splits", {}):
            have = ", ".join(manifest.get("splits", {}))
            raise TrainError(
                f"{cfg.data.shards}: no split {split!r} (splits: {have}); "
                "pass --train-split / --valid-split"
            )
    if embeddings.is_embedding_set(manifest):
        fixed = embeddings.config_overrides(cfg, manifest, cfg.data.shards)
        if mil.is_mil(cfg):
            fixed.update(mil.config_overrides(cfg, manifest, cfg.data.shards))
        return replace(cfg, **{**fixed, "data": {"num_classes": n, **fixed["data"]}})
    if mil.is_mil(cfg):
        raise ConfigError(
            f"--model {cfg.model.model}: a MIL head trains on the slide bags of embedded slide "
            f"tiles, and {cfg.data.shards} holds images; embed them first: python -m "
            f"histodist.embed --model MODEL --shards {cfg.data.shards} --out EMB, then --shards EMB"
        )
    if cfg.model.model in embeddings.HEADS:  # a linear / MLP head on the raw pixels
        return replace(cfg, data={"num_classes": n, "image_size": size},
                       model={"embed_dim": 3 * size * size})  # fmt: skip
    return replace(cfg, data={"num_classes": n, "image_size": size})


def run_dir_for(cfg: Config) -> Path:
    """runs_dir/<run name>; under a W&B sweep agent <run name>-<W&B run id>, so that each run
    the agent starts with the same flags gets its own folder."""
    name = cfg.train.run_name or f"{cfg.data.dataset}-{hub.safe_name(cfg.model.model)}"
    swept = sweep_run_id()
    return Path(cfg.train.runs_dir) / (f"{name}-{swept}" if swept else name)


def prepare_run_dir(
    acc, cfg: Config, manifest: dict, note: str | None = None
) -> tuple[Path, runlock.RunLock | None]:
    """runs/<name>/ for this run and its lock: (run folder, RunLock on the main process or
    None). The main process locks the folder for the run's life (training.runlock; another
    run holding it is an error), then a new run gets config.yaml (`note` as its leading
    comment) and manifest.json now; a run that holds a checkpoint needs --resume, and its saved
    config and manifest are checked against this one (the files are rewritten only once its
    state has loaded, by resume_state). The main process looks at the folder and broadcasts
    what it found, or its error: every rank raises it, none waits for the others."""
    from histodist.training.checkpoint import has_checkpoint, resume_conflicts
    from histodist.training.distributed import on_main

    run_dir, held_lock = run_dir_for(cfg), []

    def look() -> tuple[str | None, bool, list[str]]:
        lock, warning = runlock.acquire(run_dir)
        held_lock.append(lock)
        held = has_checkpoint(run_dir / "checkpoints")
        conflicts = resume_conflicts(run_dir, cfg, manifest) if held and cfg.train.resume else []
        if not held:
            write_run_files(cfg, manifest, run_dir, note)
        return warning, held, conflicts

    try:
        warning, held, conflicts = on_main(acc, look)
        if warning:
            acc.print(warning)
        if held and not cfg.train.resume:
            raise TrainError(
                f"{run_dir}: already holds a checkpoint; pass --resume to continue it "
                "or --run-name NEW for a new run"
            )
        if conflicts:
            raise TrainError(
                f"{run_dir}: --resume with settings its checkpoint cannot take: "
                f"{'; '.join(conflicts)}; keep them, or pass --run-name NEW for a new run "
                f"(--weights {run_dir}/checkpoints/last starts it from this run's weights)"
            )
    except BaseException:
        release(held_lock[0] if held_lock else None)
        raise
    return run_dir, held_lock[0] if held_lock else None


def release(lock: runlock.RunLock | None) -> None:
    """Release a run folder's lock (None: nothing held on this process)."""
    if lock is not None:
        lock.release()


def write_run_files(cfg: Config, manifest: dict, run_dir: Path, note: str | None = None) -> None:
    """config.yaml (`note` as its leading comment) and manifest.json of the run, each written
    atomically (main process)."""
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml", note=note)
    atomic_write(run_dir / "manifest.json", json.dumps(manifest, indent=1))


def loaders(acc, cfg: Config, manifest: dict):
    if mil.is_mil(cfg):
        return mil.loaders(acc, cfg, manifest)
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
        verify_shards=d.verify_shards,
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
    acc.print(f"data: {d.train_split}: {train.describe()}")
    return train, valid


def class_weights(manifest: dict, split: str, n: int) -> torch.Tensor:
    """Inverse-frequency class weights N / (C * n_c), float32 (C,); absent classes get 0."""
    counts = torch.tensor(manifest["splits"][split]["class_counts"], dtype=torch.float32)
    w = counts.sum() / (n * counts.clamp(min=1))
    return torch.where(counts > 0, w, torch.zeros_like(w))


def build_parts(acc, cfg: Config, manifest: dict, run_dir: Path, mode: str) -> Parts:
    """Model, optimizer, schedule, augmentation, loss and loaders, prepared by Accelerate."""
    n_cls, size = cfg.data.num_classes, cfg.data.image_size
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts)
    model = build_model(cfg.model, num_classes=n_cls, image_size=size)
    adapt(model, cfg.model)  # --finetune / --grad-checkpointing
    mean, std = _norm(cfg, manifest, model)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_dl, valid_dl = loaders(acc, cfg, manifest)
    augment, eval_transform = _transforms(cfg, manifest, mean, std)
    # The scaled peak lr goes to the optimizer only: the saved config keeps what the user asked.
    optimizer = build_optimizer(
        model, dataclasses.replace(cfg.optim, lr=scaled_lr(cfg.optim, acc.num_processes))
    )
    total, warmup = schedule_length(cfg.optim, cfg.train.epochs, len(train_dl))
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps=total, warmup_steps=warmup)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    ema = _ema(acc, model, cfg)
    bag_run = mil.is_mil(cfg)
    weights = (mil.class_weights if bag_run else class_weights)(
        manifest, cfg.data.train_split, n_cls
    ).to(acc.device)
    criterion = nn.CrossEntropyLoss(
        weight=weights if cfg.data.class_balance == "loss" else None,
        label_smoothing=cfg.optim.label_smoothing,
    )
    if mode != "disabled":
        acc.init_trackers(
            cfg.log.project,
            init_kwargs=wandb_init_kwargs(run_dir, run_dir.name, mode, cfg.log.entity)
            if acc.is_main_process
            else {},
        )
        record_config(acc, cfg.flags())
    return Parts(
        accelerator=acc,
        cfg=cfg,
        model=model,
        forward=torch.compile(model) if cfg.model.compile else model,
        optimizer=optimizer,
        scheduler=scheduler,
        augment=augment,
        eval_transform=eval_transform,
        criterion=criterion,
        train_loader=train_dl,
        valid_loader=valid_dl,
        log=RunLog(acc, run_dir, use_wandb=mode != "disabled"),
        run_dir=run_dir,
        meta=_meta(cfg, manifest, mean, std, ema is not None),
        ema=ema,
        sample_weights=weights if cfg.data.class_balance == "sampler" else None,
        valid_size=mil.num_slides(manifest, cfg.data.valid_split)
        if bag_run
        else int(manifest["splits"][cfg.data.valid_split]["num_samples"]),
        objective=mil.objective(cfg, weights, acc.device) if bag_run else None,
    )


def _transforms(cfg: Config, manifest: dict, mean, std):
    """(training augmentation, eval transform) on the device; identity for embedding vectors."""
    if embeddings.is_embedding_set(manifest):
        return embeddings.identity, embeddings.identity
    size, crop = cfg.data.image_size, cfg.augment.crop
    return (
        aug.build(cfg.augment.augment, out_size=size, mean=mean, std=std, crop=crop),
        aug.eval_transform(out_size=size, mean=mean, std=std, crop=crop),
    )


def _norm(cfg: Config, manifest: dict, model: nn.Module):
    # Hub models are normalised as they were pretrained, whatever the dataset's statistics.
    if cfg.augment.normalize == "model" or "mean" not in manifest or hub.is_hub(cfg.model.model):
        return model_norm(model)
    return tuple(manifest["mean"]), tuple(manifest["std"])


def _ema(acc, model: nn.Module, cfg: Config):
    if cfg.optim.ema <= 0:
        return None
    from timm.utils import ModelEmaV3

    # Not registered with accelerate (it unpickles custom objects with weights_only=False):
    # checkpoint.save_last writes the EMA weights as safetensors and resume loads them.
    return ModelEmaV3(acc.unwrap_model(model), decay=cfg.optim.ema)


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
    """With --resume, the newest loadable state of the run (every rank loads the folder the
    main process chose) and then the new config.yaml (manifest.json stays the one the run
    trained on); a fresh State when there is none or without --resume."""
    if not p.cfg.train.resume:
        return State()
    from histodist.training import resume as relayout
    from histodist.training.checkpoint import resume

    root = p.run_dir / "checkpoints"
    peaks = relayout.peak_lrs(p)  # before loading, which restores the saved run's lrs
    extra = {"model_ema.safetensors": p.ema.module} if p.ema is not None else None
    meta = resume(p.accelerator, root, extra, say=p.log.print)
    if p.accelerator.is_main_process:
        save_config(p.cfg, p.run_dir / "config.yaml", note=p.config_note)
    if meta is None:
        p.log.print(f"--resume: no checkpoint in {root}; starting a new run")
        return State()
    st = State.from_meta(meta)
    relayout.adapt(p, st, meta, peaks)
    p.log.print(
        f"resumed {root}/{STEP.format(st.step)} at epoch {st.epoch + 1}, "
        f"batch {st.batch_in_epoch}, step {st.step}"
    )
    return st


def apply_freeze(p: Parts, epoch: int) -> None:
    """Backbone frozen for the first --freeze-epochs epochs, trainable afterwards."""
    if p.cfg.model.freeze_epochs:
        frozen = epoch < p.cfg.model.freeze_epochs
        set_backbone_trainable(p.accelerator.unwrap_model(p.model), not frozen)
