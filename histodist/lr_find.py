"""Learning-rate range test: `python -m histodist.lr_find --dataset pcam --model resnet50`.

Trains from the configured start for up to --num-steps optimizer steps while the learning rate
grows exponentially from --start-lr to --end-lr, records the smoothed training loss, stops once
it exceeds 4x its minimum, saves the loss-vs-lr plot as PNG and prints a suggested --lr: the lr
of the steepest loss descent (a common rule, e.g. fastai's `valley`/`steep` suggestions).
Takes every histodist.train option (model, batch size, augmentation, precision, ...).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch

from histodist import augment as aug
from histodist.config import Config, build_parser, replace, resolve_namespace
from histodist.data.loader import load_manifest
from histodist.errors import run_cli
from histodist.fileio import atomic_path
from histodist.models import build_model
from histodist.training import build
from histodist.training.optim import build_optimizer

LR_FLAGS = ("start_lr", "end_lr", "num_steps", "out")


def parse(argv: list[str] | None) -> tuple[Config, dict]:
    p = build_parser("histodist.lr_find", description=__doc__.split("\n")[0])
    g = p.add_argument_group("lr_find")
    g.add_argument("--start-lr", dest="start_lr", type=float, default=1e-7, help="(default 1e-7)")
    g.add_argument("--end-lr", dest="end_lr", type=float, default=1.0, help="(default 1.0)")
    g.add_argument("--num-steps", dest="num_steps", type=int, default=100, help="(default 100)")
    g.add_argument("--out", default="lr_find.png", help="plot path (default lr_find.png)")
    ns = vars(p.parse_args(argv))
    opts = {k: ns.pop(k) for k in LR_FLAGS if k in ns}
    opts = {"start_lr": 1e-7, "end_lr": 1.0, "num_steps": 100, "out": "lr_find.png", **opts}
    return resolve_namespace(ns), opts


def range_test(cfg: Config, *, start_lr: float, end_lr: float, num_steps: int):
    """(lrs, smoothed losses, accelerator) of the range test; lr is the head group's lr at
    each step."""
    from accelerate import Accelerator

    manifest = load_manifest(cfg.data.shards)
    cfg, choice = build.resolve_precision(build.complete_config(cfg, manifest))
    acc = Accelerator(mixed_precision=cfg.train.precision)
    acc.print(choice.describe())
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, num_classes=cfg.data.num_classes, image_size=cfg.data.image_size)
    opt = build_optimizer(model, replace(cfg, optim={"lr": start_lr}).optim)
    model, opt = acc.prepare(model, opt)
    train_dl, _ = build.loaders(acc, cfg, manifest)
    mean, std = build._norm(cfg, manifest, model)
    augment = aug.build(cfg.augment.augment, out_size=cfg.data.image_size, mean=mean, std=std)
    gen = torch.Generator(device=acc.device).manual_seed(cfg.train.seed + acc.process_index)
    factor = (end_lr / start_lr) ** (1 / max(1, num_steps - 1))
    lrs, losses, avg, best = [], [], 0.0, math.inf
    batches = _cycle(train_dl)
    model.train()
    for step in range(num_steps):
        batch = next(batches)
        x = augment(batch["image"].to(acc.device), gen)
        loss = torch.nn.functional.cross_entropy(model(x).float(), batch["label"].to(acc.device))
        acc.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = acc.reduce(loss.detach(), reduction="mean").item()
        avg = 0.98 * avg + 0.02 * value  # exponential smoothing with bias correction
        smooth = avg / (1 - 0.98 ** (step + 1))
        lrs.append(max(g["lr"] for g in opt.param_groups))
        losses.append(smooth)
        best = min(best, smooth)
        if not math.isfinite(smooth) or smooth > 4 * best:
            break
        for g in opt.param_groups:
            g["lr"] *= factor
    return lrs, losses, acc


def _cycle(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def suggest(lrs: list[float], losses: list[float]) -> float:
    """The lr of the steepest descent of the smoothed loss over log(lr), ignoring the first
    10% of the steps (the smoothing's start) and the diverging tail."""
    if len(lrs) < 4:
        return lrs[-1] if lrs else math.nan
    lo = max(1, len(lrs) // 10)
    hi = int(np.argmin(losses)) + 1
    if hi - lo < 3:
        lo, hi = 0, len(lrs)
    g = np.gradient(np.asarray(losses[lo:hi]), np.log(np.asarray(lrs[lo:hi])))
    return float(lrs[lo + int(np.argmin(g))])


def plot(lrs: list[float], losses: list[float], lr: float, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(lrs, losses)
    ax.axvline(lr, color="r", ls="--", label=f"suggested lr {lr:.2e}")
    ax.set(
        xscale="log", xlabel="learning rate", ylabel="smoothed training loss", title="LR range test"
    )
    ax.legend()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    return run_cli("lr_find", _main, argv)


def _main(argv: list[str] | None) -> int:
    cfg, opts = parse(argv)
    lrs, losses, acc = range_test(
        cfg, start_lr=opts["start_lr"], end_lr=opts["end_lr"], num_steps=opts["num_steps"]
    )
    if acc.is_main_process:
        lr = suggest(lrs, losses)
        path = plot(lrs, losses, lr, opts["out"])
        print(
            f"lr_find: {len(lrs)} steps, {lrs[0]:.1e} .. {lrs[-1]:.1e}; plot {path}; "
            f"suggested --lr {lr:.2e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
