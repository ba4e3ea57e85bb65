"""Learning-rate range test: `python -m histodist.lr_find --dataset pcam --model resnet50`.

Trains from the configured start for up to --num-steps optimizer steps while the learning rate
grows exponentially from --start-lr to --end-lr, records the smoothed training loss, stops once
it exceeds 4x its minimum, saves the loss-vs-lr plot as PNG and prints a suggested --lr: the lr
of the steepest loss descent (a common rule, e.g. fastai's `valley`/`steep` suggestions).

Takes every histodist.train option and shares training's setup and step: the model, optimizer,
loss (label smoothing, class-balanced loss or resampling), augmentation (--crop), channels_last,
gradient accumulation and clipping, per-micro-step seeding and the frozen backbone of the first
epoch all come from histodist.training (build.build_parts, loop.micro_step, loop.optimizer_step);
only the lr schedule is replaced. The swept lr is the largest parameter group's lr as applied,
the other groups keep their ratio to it (--backbone-lr-scale, --layer-decay); the suggestion is
printed as the --lr that histodist.train scales (--lr-scaling) to that applied lr.
"""

from __future__ import annotations

import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from histodist.config import (
    Config,
    ConfigError,
    OptimConfig,
    build_parser,
    replace,
    resolve_namespace,
)
from histodist.errors import run_cli
from histodist.fileio import atomic_path
from histodist.training.optim import scaled_lr

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
    for name in ("start_lr", "end_lr"):
        if not (math.isfinite(opts[name]) and opts[name] > 0):
            raise ConfigError(f"--{name.replace('_', '-')} {opts[name]}: must be a number > 0")
    if opts["end_lr"] < opts["start_lr"]:  # equal: a constant-lr run of training's step
        raise ConfigError(f"--end-lr {opts['end_lr']}: must be >= --start-lr {opts['start_lr']}")
    if opts["num_steps"] < 1:
        raise ConfigError(f"--num-steps {opts['num_steps']}: must be >= 1")
    return resolve_namespace(ns), opts


@dataclass
class RangeTest:
    """What the range test recorded, on every rank (the losses are reduced over ranks)."""

    lrs: list[float]  # the largest parameter group's applied lr at each optimizer step
    losses: list[float]  # smoothed training loss after each step (bias-corrected EMA)
    lr_flag_scale: float  # --lr of histodist.train per unit of applied lr (1 without scaling)
    is_main: bool  # this process prints and writes


def lr_flag(applied: float, o: OptimConfig, world: int, top_scale: float = 1.0) -> float:
    """The --lr with which histodist.train, on `world` processes, applies `applied` to its
    largest parameter group: training's peak lr is scaled_lr(o, world) (--lr-scaling), times
    `top_scale`, the largest group's lr factor (1: the head; more with --backbone-lr-scale > 1)."""
    return applied * o.lr / (scaled_lr(o, world) * top_scale)


def setup(cfg: Config, run_dir: Path):
    """Training's parts (histodist.train.setup without W&B, images or a kept run folder):
    `run_dir` is a throw-away folder (only the main process writes metrics.jsonl there)."""
    from histodist import train
    from histodist.training import build

    p = train.setup(replace(cfg, log={"wandb": "disabled", "log_images": False}), run_dir)
    build.apply_freeze(p, 0)  # the test starts where training starts
    return p


def exponential_schedule(p, start_lr: float, end_lr: float, num_steps: int):
    """Replace p.scheduler by one on the same optimizer that multiplies every group's lr by the
    same factor each step: the largest group goes from start_lr (step 0) to end_lr (step
    num_steps - 1), the others keep their ratio to it. Returns the top group's lr factor
    relative to the scaled peak lr (see lr_flag)."""
    inner = getattr(p.optimizer, "optimizer", p.optimizer)  # accelerate's AcceleratedOptimizer
    peaks = [g["initial_lr"] for g in inner.param_groups]  # training's per-group peak lrs
    top = max(peaks)
    for g, peak in zip(inner.param_groups, peaks, strict=True):
        g["initial_lr"] = g["lr"] = peak * start_lr / top
    factor = (end_lr / start_lr) ** (1 / max(1, num_steps - 1))
    p.scheduler = torch.optim.lr_scheduler.LambdaLR(inner, lambda s: factor**s)
    return top / scaled_lr(p.cfg.optim, p.accelerator.num_processes)


def range_test(cfg: Config, *, start_lr: float, end_lr: float, num_steps: int) -> RangeTest:
    """Train up to `num_steps` optimizer steps of training's own step under an exponentially
    growing lr; stop once the smoothed loss is non-finite or above 4x its minimum."""
    with tempfile.TemporaryDirectory(prefix="histodist-lr_find-") as tmp:
        p = setup(cfg, Path(tmp))
        try:
            top_scale = exponential_schedule(p, start_lr, end_lr, num_steps)
            lrs, losses = _sweep(p, num_steps)
        finally:
            p.log.close()
    acc = p.accelerator
    scale = lr_flag(1.0, p.cfg.optim, acc.num_processes, top_scale)
    return RangeTest(lrs, losses, lr_flag_scale=scale, is_main=acc.is_main_process)


def _sweep(p, num_steps: int) -> tuple[list[float], list[float]]:
    """(applied lr, smoothed loss) per optimizer step; each step is accum_steps calls of
    loop.micro_step and one loop.optimizer_step, seeded per micro-step as in training."""
    from histodist.training import loop

    acc, accum = p.accelerator, p.cfg.optim.accum_steps
    gen = torch.Generator(device=acc.device)
    st, batches, micro = loop.State(), p.train_loader.forever(), 0
    lrs, losses, avg, best = [], [], 0.0, math.inf
    p.model.train()
    for step in range(num_steps):
        lrs.append(max(g["lr"] for g in p.optimizer.param_groups))
        window = loop.Window()
        for k in range(accum):
            loop.seed_micro_step(p, gen, micro)
            sync = k + 1 == accum
            window.add(loop.micro_step(p, next(batches), gen, sync, accum, first=micro == 0))
            micro += 1
        loop.optimizer_step(p, st, window)
        mean = torch.stack(window.since_log).float().mean()
        value = acc.reduce(mean, reduction="mean").item()  # one host sync per step
        avg = 0.98 * avg + 0.02 * value  # exponential smoothing with bias correction
        smooth = avg / (1 - 0.98 ** (step + 1))
        losses.append(smooth)
        best = min(best, smooth)
        if not math.isfinite(smooth) or smooth > 4 * best:
            break
    return lrs, losses


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
    r = range_test(cfg, start_lr=opts["start_lr"], end_lr=opts["end_lr"],
                   num_steps=opts["num_steps"])  # fmt: skip
    if r.is_main:
        lr = suggest(r.lrs, r.losses)
        path = plot(r.lrs, r.losses, lr, opts["out"])
        flag = lr * r.lr_flag_scale
        applied = "" if math.isclose(flag, lr) else f" (applied peak lr {lr:.2e})"
        print(
            f"lr_find: {len(r.lrs)} steps, {r.lrs[0]:.1e} .. {r.lrs[-1]:.1e}; plot {path}; "
            f"suggested --lr {flag:.2e}{applied}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
