"""The training loop: one epoch, one optimizer step, evaluation, checkpoints. Built by train.py;
lr_find.py runs its micro-step and optimizer step.

Every function here is collective: all ranks call it in the same order (DDP, all-reduces and
checkpoints need every rank); only logging and file writes are main-process-only.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from histodist import metrics
from histodist.inference.core import tta_probs
from histodist.training import checkpoint as ckpt
from histodist.training.distributed import NonFinite, Preemption, gather_varlen, step_seed
from histodist.training.monitor import Monitor
from histodist.training.tracking import RunLog


@dataclass
class State:
    """Where training is; saved as the checkpoint's meta.json and restored on resume."""

    epoch: int = 0  # epoch in progress (0-based)
    batch_in_epoch: int = 0  # micro-batches of `epoch`'s loader order already trained
    step: int = 0  # optimizer steps done
    samples_in_epoch: int = 0  # samples of `epoch` trained over all ranks (any world size)
    stop_batch: int | None = None  # micro-batch where `epoch` ends (None: the loader's length)
    samples: int = 0  # samples trained since the start of the run, over all ranks
    lr_shift: float = 0.0  # added to the scheduler's step count after a resume at a new layout
    best: float | None = None  # best validation metric so far
    best_step: int = -1
    stale: int = 0  # validations without improvement (early stopping)
    bad_steps: int = 0  # consecutive optimizer steps with a NaN/inf loss

    @classmethod
    def from_meta(cls, meta: dict) -> State:
        return cls(**{k: meta[k] for k in asdict(cls()) if k in meta})


@dataclass
class Parts:
    """Everything the loop needs, built once by train.setup() (or lr_find.setup())."""

    accelerator: Any
    cfg: Any
    model: nn.Module  # prepared (DDP-wrapped when distributed)
    forward: nn.Module  # what to call for training: the prepared model, or its compiled form
    optimizer: Any
    scheduler: Any
    augment: Any
    eval_transform: Any
    criterion: nn.Module
    train_loader: Any
    valid_loader: Any
    log: RunLog
    run_dir: Path
    meta: dict  # constant checkpoint metadata (hashes, classes, input size)
    ema: nn.Module | None = None
    sample_weights: torch.Tensor | None = None  # per class, for --class-balance sampler
    preempt: Preemption = field(default_factory=Preemption)
    valid_size: int = 0  # expected number of validation samples (manifest)
    nonfinite: NonFinite | None = None  # device-side count of skipped updates (optimizer_step)
    config_note: str | None = None  # leading comment of config.yaml (the precision chosen and why)
    monitor: Monitor = field(default_factory=Monitor)  # data wait and peak memory per log line
    # (forward, x, y, batch) -> loss, replacing criterion(forward(x), y): a MIL head's loss
    # (training.mil.BagLoss: per-bag weights, the label inside the forward pass)
    objective: nn.Module | None = None
    lock: Any = None  # the run folder's lock (training.runlock), held by the main process


class StopTraining(Exception):
    """Raised inside the loop to stop every rank: reason is preempted / nan / early-stop."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------------- training
def rebalance(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, gen: torch.Generator):
    """Class-balanced resampling within a batch: draw len(y) samples with replacement with
    probability proportional to weights[y] (inverse class frequency); same batch size."""
    idx = torch.multinomial(weights[y].float(), len(y), replacement=True, generator=gen)
    return x[idx], y[idx]


def train_one_epoch(p: Parts, st: State) -> None:
    """Train the rest of epoch `st.epoch`: from `st.batch_in_epoch` on resume, up to
    `st.stop_batch` when a resume at a new world size left fewer samples in the epoch."""
    acc, cfg = p.accelerator, p.cfg
    n, accum = len(p.train_loader), cfg.optim.accum_steps
    p.train_loader.set_epoch(st.epoch)
    p.model.train()
    gen = torch.Generator(device=acc.device)
    skip, stop = st.batch_in_epoch, n if st.stop_batch is None else st.stop_batch
    per_batch = cfg.optim.batch_size * acc.num_processes  # samples per micro-batch, all ranks
    bar = _bar(p, stop, skip, f"epoch {st.epoch + 1}/{cfg.train.epochs}")
    window = Window()
    p.preempt.restart_clock(st.step)
    batches = enumerate(p.monitor.batches(p.train_loader, acc.device))
    if stop < n:  # stop early without fetching (and recording) a batch past `stop`
        batches = itertools.islice(batches, stop)
    for i, batch in batches:
        if i < skip:
            continue  # resume: the loader replays the epoch; skip the batches already trained
        micro = st.epoch * n + i
        seed_micro_step(p, gen, micro)
        sync = (i + 1) % accum == 0 or i + 1 == stop
        window.add(micro_step(p, batch, gen, sync, accum, first=(micro == 0)))
        st.batch_in_epoch = i + 1
        st.samples_in_epoch += per_batch
        st.samples += per_batch
        bar.update(1)
        if sync:
            optimizer_step(p, st, window)
            window = Window(t0=window.t0, images=window.images, since_log=window.since_log)
            after_step(p, st, window, bar)
    check_health(p, st)  # before validation: a diverged run stops without scoring junk
    bar.close()
    st.epoch, st.batch_in_epoch, st.samples_in_epoch, st.stop_batch = st.epoch + 1, 0, 0, None


def seed_micro_step(p: Parts, gen: torch.Generator, micro: int) -> None:
    """Seed augmentation (`gen`) and dropout (torch's global generator) for micro-step `micro`
    on this rank, so a resumed run draws the same numbers as the uninterrupted one."""
    rank = p.accelerator.process_index
    gen.manual_seed(step_seed(p.cfg.train.seed, micro, rank))
    torch.manual_seed(step_seed(p.cfg.train.seed + 1, micro, rank))


@dataclass
class Window:
    """Losses of the current accumulation window and counters since the last log line. The
    losses stay on the device: they are read once per log line, so no step waits for the GPU."""

    t0: float = field(default_factory=time.perf_counter)
    images: int = 0
    since_log: list = field(default_factory=list)
    finite: torch.Tensor | None = None  # bool scalar on the device: every loss so far finite

    def add(self, out: tuple[torch.Tensor, int]) -> None:
        loss, n = out
        self.images += n
        ok = torch.isfinite(loss)
        self.finite = ok if self.finite is None else self.finite & ok
        self.since_log.append(loss)


def micro_step(p: Parts, batch: dict, gen, sync: bool, accum: int, first: bool):
    """Forward and backward of one micro-batch; gradients are all-reduced only when `sync`."""
    acc = p.accelerator
    x = batch["image"].to(acc.device, non_blocking=True)
    y = batch["label"].to(acc.device, non_blocking=True)
    if p.sample_weights is not None:
        x, y = rebalance(x, y, p.sample_weights, gen)
    x = p.augment(x, gen)
    if first and p.cfg.log.log_images:
        log_input_grid(p, x)
    if p.cfg.model.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with contextlib.nullcontext() if sync else acc.no_sync(p.model):
        if p.objective is None:
            loss = p.criterion(p.forward(x).float(), y)
        else:
            loss = p.objective(p.forward, x, y, batch)
        acc.backward(loss / accum)
    return loss.detach(), len(y)


def optimizer_step(p: Parts, st: State, window: Window) -> None:
    """Clip, step and schedule. When any rank saw a NaN/inf loss in this window the update is
    dropped on every rank, decided on the device (the fused optimizer's found_inf, as AMP
    skips an overflowing step), so nothing here waits for the GPU; check_health reads the count
    at log time. Raises StopTraining on preemption: one process looks at its flag every step,
    several agree on it at the times Preemption schedules (distributed.Preemption)."""
    acc = p.accelerator
    if p.nonfinite is None:
        p.nonfinite = NonFinite(acc.device, st.bad_steps)
    bad = ~window.finite
    if acc.num_processes > 1:  # one rank's NaN reaches every rank's gradients through DDP
        bad = acc.reduce(bad.float(), reduction="max") > 0
    p.nonfinite.update(bad)
    if p.cfg.optim.grad_clip > 0:
        acc.clip_grad_norm_(p.model.parameters(), p.cfg.optim.grad_clip)
    masked_step(p.optimizer, bad)
    if p.ema is not None:  # after a skipped update the weights are unchanged and finite
        p.ema.update(acc.unwrap_model(p.model), step=st.step)
    p.scheduler.step()
    p.optimizer.zero_grad(set_to_none=True)
    st.step += 1
    if acc.num_processes == 1:
        if p.preempt.received is not None:
            raise StopTraining("preempted")
    # Several: between log lines (check_health agrees at those) only when steps are slow.
    elif st.step % p.cfg.log.log_every and p.preempt.agreed_if_due(
        acc, st.step, p.cfg.log.log_every
    ):
        raise StopTraining("preempted")


def masked_step(optimizer, skip: torch.Tensor) -> None:
    """optimizer.step() unless the bool scalar `skip` (on the device) is True, without reading
    it on the host: torch's fused AdamW / SGD take a `found_inf` tensor (set as an attribute,
    the way torch.amp.GradScaler passes it) and leave parameters and state untouched when it
    is non-zero (histodist.training.optim builds them fused). Another optimizer reads the flag (one
    host sync) and steps only when it is False."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    if any(g.get("fused") for g in inner.param_groups):
        inner.found_inf = skip.float()
        try:
            optimizer.step()
        finally:
            if hasattr(inner, "found_inf"):
                del inner.found_inf
    elif not bool(skip):
        optimizer.step()


def check_health(p: Parts, st: State) -> None:
    """The log-time check (one host sync): skipped updates since the last check, and the stop
    rules: too many consecutive NaN/inf losses, or a preemption signal on any rank."""
    if p.nonfinite is not None:
        worst, current, skipped = p.nonfinite.read()
        st.bad_steps = current
        if skipped:
            p.log.print(
                f"step {st.step}: {skipped} update(s) skipped for a non-finite loss since the "
                f"last log line ({worst} in a row at most)"
            )
        if worst >= p.cfg.train.max_bad_steps:
            st.bad_steps = worst
            raise StopTraining("nan")
    acc = p.accelerator
    if acc.num_processes > 1 and p.preempt.agree(acc, st.step, p.cfg.log.log_every):
        raise StopTraining("preempted")


def after_step(p: Parts, st: State, window: Window, bar) -> None:
    """Per-step logging and health check, and the optional step-wise validation / checkpoint."""
    cfg = p.cfg
    if st.step % cfg.log.log_every == 0:
        log_train(p, st, window, bar)
        check_health(p, st)
    if cfg.train.eval_every and st.step % cfg.train.eval_every == 0:
        t0 = time.perf_counter()
        validate(p, st)
        window.t0 += time.perf_counter() - t0  # the next log line times training alone
    elif cfg.train.checkpoint_every and st.step % cfg.train.checkpoint_every == 0:
        save(p, st, improved=False)


def log_train(p: Parts, st: State, window: Window, bar) -> None:
    acc = p.accelerator
    losses = torch.stack(window.since_log).float().mean()
    loss = acc.reduce(losses, reduction="mean").item()
    dt = max(time.perf_counter() - window.t0, 1e-9)
    per_rank = window.images / dt
    values = {
        "train/loss": loss,
        "train/lr": max(g["lr"] for g in p.optimizer.param_groups),
        "train/img_per_s": per_rank * acc.num_processes,
        "train/img_per_s_per_device": per_rank,
        "epoch": epoch_now(p, st),
        **p.monitor.window(acc, dt),
    }
    p.log.log(values, step=st.step)
    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{values['train/img_per_s']:.0f}")
    window.t0, window.images, window.since_log = time.perf_counter(), 0, []


def epoch_now(p: Parts, st: State) -> float:
    """Epochs trained, fractional within an epoch (the x axis a dashboard compares runs on)."""
    return st.epoch + st.batch_in_epoch / max(1, len(p.train_loader))


def _bar(p: Parts, total: int, initial: int, desc: str):
    from tqdm import tqdm

    off = not (p.accelerator.is_main_process and p.cfg.log.progress)
    return tqdm(
        total=total, initial=initial, desc=desc, disable=off, dynamic_ncols=True, leave=False
    )


# ----------------------------------------------------------------------------- evaluation
def _forward(p: Parts, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Float32 logits; with `--val-tta N` the log of the mean softmax over N dihedral views
    (a valid logit: its softmax is that mean, so the loss and metrics need no other path)."""
    tta = p.cfg.train.val_tta
    with p.accelerator.autocast():
        if tta == 1:
            return net(x).float()
        return tta_probs(net, x, tta).clamp_min(1e-12).log()  # float32 already


@torch.no_grad()
def predict(p: Parts) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits float32 (N, C), labels int64 (N,)) over the whole validation split, gathered
    from every rank (every sample exactly once), on the accelerator's device."""
    acc = p.accelerator
    net = p.ema.module if p.ema is not None else acc.unwrap_model(p.model)
    was_training = net.training
    net.eval()
    logits, labels = [], []
    for batch in p.valid_loader:
        x = p.eval_transform(batch["image"].to(acc.device, non_blocking=True))
        if p.cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits.append(_forward(p, net, x))
        labels.append(batch["label"].to(acc.device))
    net.train(was_training)
    n_cls = p.meta["num_classes"]
    out = torch.cat(logits) if logits else torch.zeros(0, n_cls, device=acc.device)
    lab = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=acc.device)
    return gather_varlen(acc, out), gather_varlen(acc, lab)


def evaluate(p: Parts) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Validation metrics (same on every rank), probabilities and labels."""
    logits, labels = predict(p)
    keep = labels >= 0  # unlabelled samples carry -1
    logits, labels = logits[keep], labels[keep]
    loss = F.cross_entropy(logits, labels).item() if len(labels) else math.nan
    probs = logits.softmax(1)
    m = metrics.summary(probs, labels)
    m.update(loss=loss, neg_loss=-loss, num_samples=len(labels))
    return m, probs, labels


def validate(p: Parts, st: State) -> dict[str, float]:
    """Evaluate, log, save `last` and, when the preset's metric improved, `best`."""
    t0 = time.perf_counter()
    m, probs, labels = evaluate(p)
    if p.valid_size and m["num_samples"] != p.valid_size:
        p.log.print(f"warning: validated {m['num_samples']} samples, manifest lists {p.valid_size}")
    value = m.get(p.cfg.train.metric, math.nan)
    improved = metrics.is_better(value, st.best)
    if improved:
        st.best, st.best_step, st.stale = value, st.step, 0
    else:
        st.stale += 1
    m["time_s"] = time.perf_counter() - t0
    p.log.log({**{f"val/{k}": v for k, v in m.items()}, **best_so_far(p, st)}, step=st.step)
    log_curves(p, probs, labels, st.step)
    save(p, st, improved=improved)
    return m


def best_so_far(p: Parts, st: State) -> dict[str, float]:
    """`best/<metric>` and `best/step` of the run so far (the columns a W&B runs table sorts
    runs by; the last value is the run's best), and the epoch."""
    out = {"epoch": epoch_now(p, st)}
    if st.best is not None:
        out.update({f"best/{p.cfg.train.metric}": st.best, "best/step": st.best_step})
    return out


def save(p: Parts, st: State, *, improved: bool) -> None:
    o = p.cfg.optim
    meta = {**p.meta, **asdict(st), "world_size": p.accelerator.num_processes,
            "batch_size": o.batch_size, "accum_steps": o.accum_steps}  # fmt: skip
    if improved:  # the state `best` points to records the value that made it best
        meta.update(metric=p.cfg.train.metric, value=st.best)
    root = p.run_dir / "checkpoints"
    extra = {}
    if p.ema is not None:
        extra["model_ema.safetensors"] = p.ema.module.state_dict()
    ckpt.save_last(
        p.accelerator, root, meta, keep_last=p.cfg.train.keep_last, extra=extra, best=improved
    )


# ----------------------------------------------------------------------------- images
def log_input_grid(p: Parts, x: torch.Tensor) -> None:
    """PNG of the first augmented batch (as the model sees it) in the run folder and W&B."""
    if not p.accelerator.is_main_process:
        return
    from histodist.augment import save_grid

    path = save_grid(
        x[:64], p.run_dir / "augmented_inputs.png", mean=p.meta["mean"], std=p.meta["std"]
    )
    run = p.log.wandb_run()
    if run is not None:
        import wandb

        run.log({"train/augmented_inputs": wandb.Image(str(path))}, step=0)


def log_curves(p: Parts, probs: torch.Tensor, labels: torch.Tensor, step: int) -> None:
    """ROC curve and confusion matrix as PNGs in runs/<name>/plots/ and to W&B (main process,
    --log-images); matplotlib rather than wandb.plot, which needs pandas."""
    if not (p.accelerator.is_main_process and p.cfg.log.log_images and len(labels)):
        return
    from histodist.inference.report import plot_confusion, plot_roc

    names = [str(c) for c in p.meta["classes"]]
    plots = p.run_dir / "plots"
    plots.mkdir(exist_ok=True)
    roc = plot_roc(probs.cpu().float().numpy(), labels.cpu().numpy(), names, plots / "roc.png")
    cm = plot_confusion(metrics.confusion(probs, labels).tolist(), names, plots / "confusion.png")
    run = p.log.wandb_run()
    if run is not None:
        import wandb

        run.log(
            {"val/roc": wandb.Image(str(roc)), "val/confusion": wandb.Image(str(cm))}, step=step
        )
