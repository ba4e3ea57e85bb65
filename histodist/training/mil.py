"""MIL heads in the training loop: what a run on slide bags changes, and nothing else.

A run with `--model abmil|clam-sb|transmil|mean|max` on an embedding set of slide tiles trains
through the same loop, checkpoints, resume, metrics and W&B as every run; here are only
- the config such a run fixes (one bag per process per micro-step, no image options),
- its loaders (histodist.data.bags: every rank the same number of micro-steps, each slide
  once per epoch, padding bags of loss weight 0), and
- its loss (BagLoss): the slide cross-entropy times each bag's weight, plus CLAM's instance
  loss, which needs the label inside the forward pass.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from histodist.config import Config, ConfigError, OptimConfig
from histodist.data import bags
from histodist.mil import MIL_HEADS

DEFAULT_BATCH = next(f.default for f in dataclasses.fields(OptimConfig) if f.name == "batch_size")


def is_mil(cfg: Config) -> bool:
    return cfg.model.model in MIL_HEADS


def config_overrides(cfg: Config, manifest: dict, where: str) -> dict:
    """Config sections a MIL run fixes (layered over embeddings.config_overrides); raises
    ConfigError for options a bag cannot take, EmbeddingError for a set without slides."""
    bags.slides(manifest, cfg.data.train_split, where)  # a set without a per-slide index fails
    if cfg.optim.batch_size not in (1, DEFAULT_BATCH):
        raise ConfigError(
            f"--batch-size {cfg.optim.batch_size}: a MIL head trains one slide per process per "
            "micro-step; pass --accum-steps N for N slides per process per optimizer step"
        )
    if cfg.train.val_tta != 1:
        raise ConfigError(f"--val-tta {cfg.train.val_tta}: a bag of embeddings has no views")
    if cfg.data.class_balance == "sampler":
        raise ConfigError(
            "--class-balance sampler resamples within a batch, and a MIL batch is one slide; "
            "use --class-balance loss"
        )
    return {"optim": {"batch_size": 1}}


def loaders(acc, cfg: Config, manifest: dict):
    """(training, validation) bag loaders of this rank (histodist.data.bags)."""
    d = cfg.data
    common = dict(rank=acc.process_index, world_size=acc.num_processes, workers=d.workers,
                  cache_dir=d.cache_dir, manifest=manifest)  # fmt: skip
    train = bags.bag_loader(d.shards, d.train_split, train=True, seed=cfg.train.seed,
                            max_tiles=d.max_tiles, accum_steps=cfg.optim.accum_steps,
                            **common)  # fmt: skip
    valid = bags.bag_loader(d.shards, d.valid_split, train=False, **common)
    acc.print(f"data: {d.train_split}: {train.describe()}")
    return train, valid


def class_weights(manifest: dict, split: str, n: int) -> torch.Tensor:
    """Inverse-frequency weights of the slides' classes, float32 (C,); absent classes get 0."""
    counts = torch.zeros(n)
    for s in bags.slides(manifest, split):
        if s.label >= 0:
            counts[s.label] += 1
    w = counts.sum() / (n * counts.clamp(min=1))
    return torch.where(counts > 0, w, torch.zeros_like(w))


def num_slides(manifest: dict, split: str) -> int:
    return len(bags.slides(manifest, split))


class BagLoss(nn.Module):
    """The loss of one micro-step's bags: sum over the bags of weight x (bag_weight x CE +
    (1 - bag_weight) x the head's auxiliary loss). The weights are 1 but in an epoch's last
    optimizer step (bags.epoch_plan), so the logged loss is the slides' mean loss."""

    def __init__(self, *, label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None,
                 bag_weight: float = 1.0):  # fmt: skip
        super().__init__()
        self.smoothing, self.bag_weight = label_smoothing, bag_weight
        self.register_buffer("class_weights", class_weights)

    def forward(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: dict):
        logits, aux = net(x, label=y)
        ce = F.cross_entropy(logits.float(), y, reduction="none",
                             label_smoothing=self.smoothing)  # fmt: skip
        if self.class_weights is not None:  # per bag: a mean over one bag would cancel it
            ce = ce * self.class_weights[y]
        per_bag = self.bag_weight * ce + (1.0 - self.bag_weight) * aux.float()
        weight = batch["weight"].to(ce.device, non_blocking=True)
        return (per_bag * weight).sum()


def objective(cfg: Config, weights: torch.Tensor, device) -> BagLoss:
    """The run's BagLoss: label smoothing, --class-balance loss, CLAM's bag weight."""
    bw = cfg.model.clam_bag_weight if cfg.model.model == "clam-sb" else 1.0
    cw = weights if cfg.data.class_balance == "loss" else None
    return BagLoss(label_smoothing=cfg.optim.label_smoothing, class_weights=cw,
                   bag_weight=bw).to(device)  # fmt: skip
