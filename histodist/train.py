"""Train a classifier on histodist shards: `accelerate launch -m histodist.train --dataset pcam`.

Runs unchanged on one CPU process, several CPU processes (gloo), 1..N GPUs and several nodes;
see `--help` for every option, README "Train" for the most used ones.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from histodist.config import Config, parse_args
from histodist.errors import EXIT_DIVERGED, run_cli

if TYPE_CHECKING:
    from histodist.training import loop

EXIT_NAN = EXIT_DIVERGED  # NaN/inf loss for --max-bad-steps steps


def setup(cfg: Config, run_dir: Path | None = None) -> loop.Parts:
    """Resolve the config against the shards, build the Accelerator, run folder and parts.
    `run_dir`: an existing scratch folder to log into instead of the run folder (lr_find)."""
    from histodist.data.loader import load_manifest
    from histodist.models import check_model_name
    from histodist.training import build
    from histodist.training.distributed import set_determinism
    from histodist.training.tracking import offline_line

    set_determinism(cfg.train.deterministic)
    check_model_name(cfg.model.model)
    manifest = load_manifest(cfg.data.shards)
    cfg = build.complete_config(cfg, manifest)
    cfg, choice = build.resolve_precision(cfg)
    acc, mode, why = build.make_accelerator(cfg)
    lock = None
    if run_dir is None:
        run_dir, lock = build.prepare_run_dir(acc, cfg, manifest, note=choice.describe())
    try:
        p = build.build_parts(acc, cfg, manifest, run_dir, mode)
    except BaseException:
        build.release(lock)
        raise
    p.lock, p.config_note = lock, choice.describe()
    run = p.log.wandb_run()
    if run is not None and mode == "offline":
        p.log.print(offline_line(run, why))
    elif why:
        p.log.print(why)
    p.log.print(choice.describe())
    if run is not None:
        run.config.update({"precision_reason": choice.reason}, allow_val_change=True)
    return p


def log_batch_and_lr(p, step: int) -> None:
    """State the global batch and the peak lr actually used, so runs at any scale compare."""
    from histodist.training.optim import global_batch, scaled_lr

    o, world = p.cfg.optim, p.accelerator.num_processes
    batch, lr = global_batch(o, world), scaled_lr(o, world)
    p.log.print(
        f"global batch {o.batch_size} x {world} processes x {o.accum_steps} accum = {batch}; "
        f"peak lr {lr:.4g} (--lr {o.lr:g}, --lr-scaling {o.lr_scaling})"
    )
    p.log.log({"run/global_batch": batch, "run/peak_lr": lr, "run/world_size": world}, step=step)


def run(cfg: Config) -> int:
    """Set up, train every remaining epoch, validate and checkpoint; returns the exit code.
    A collective that fails because another rank stopped becomes this rank's one-line error."""
    from histodist.training.distributed import peer_failure

    try:
        return _run(cfg)
    except RuntimeError as e:
        failure = peer_failure(e)
        if failure is None:
            raise
        raise failure from e


def _run(cfg: Config) -> int:
    from histodist.training import build
    from histodist.training.distributed import set_cpu_threads

    p = setup(cfg)
    try:
        st = build.resume_state(p)
        acc = p.accelerator
        threads = set_cpu_threads(p.cfg.train.threads, acc.device)
        p.log.print(
            f"run {p.run_dir}: {p.cfg.model.model}, {acc.num_processes} process(es) on "
            f"{acc.device} ({threads} threads), {len(p.train_loader)} batches of "
            f"{p.cfg.optim.batch_size} per process per epoch"
        )
        log_batch_and_lr(p, st.step)
        p.preempt.install()
        reason = fit(p, st)
        p.log.finish(reason, checkpoints=p.cfg.log.wandb_checkpoints)
        # On an error the handlers stay until main() has printed its line (see there).
        p.preempt.uninstall()
    finally:
        p.log.close()
        build.release(p.lock)
    return EXIT_NAN if reason == "nan" else 0


def fit(p: loop.Parts, st: loop.State) -> str:
    """Epoch loop; returns "done", "early-stop", "preempted" or "nan"."""
    from histodist.training import build, loop

    cfg = p.cfg
    while st.epoch < cfg.train.epochs:
        build.apply_freeze(p, st.epoch)
        t0 = time.perf_counter()
        try:
            loop.train_one_epoch(p, st)
        except loop.StopTraining as stop:
            return stopped(p, st, stop.reason)
        m = loop.validate(p, st)
        p.log.print(summary(st, cfg, m, time.perf_counter() - t0))
        if cfg.train.patience and st.stale >= cfg.train.patience:
            p.log.print(f"early stop: no {cfg.train.metric} improvement in {st.stale} validations")
            return "early-stop"
    return "done"


def stopped(p: loop.Parts, st: loop.State, reason: str) -> str:
    from histodist.training import loop

    if reason == "preempted":
        loop.save(p, st, improved=False)
        # Every rank says it got here: a launcher or scheduler log then shows who saved. One
        # write per line, so that lines of ranks sharing a log do not interleave.
        rank = p.accelerator.process_index
        sys.stderr.write(f"[rank {rank}] checkpoint saved at step {st.step}\n")
        sys.stderr.flush()
        who = p.preempt.received or "preemption signal on another rank"
        p.log.print(
            f"{who}: saved {p.run_dir}/checkpoints/last at step {st.step}; "
            "rerun the same command with --resume to continue"
        )
    else:
        p.log.print(
            f"histodist.train: error: loss was NaN/inf for {st.bad_steps} consecutive "
            "steps; lower --lr, keep --grad-clip on, or try --precision bf16/no"
        )
    return reason


def summary(st: loop.State, cfg: Config, m: dict, seconds: float) -> str:
    keys = ("auc", "accuracy", "balanced_accuracy", "f1")
    parts = [f"{k} {m[k]:.4f}" for k in keys if k in m]
    return (
        f"epoch {st.epoch}/{cfg.train.epochs} step {st.step}: val loss {m['loss']:.4f} "
        + " ".join(parts)
        + f" | best {cfg.train.metric} {_fmt(st.best)} at step {st.best_step} | {seconds:.0f}s"
    )


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"


def main(argv: list[str] | None = None) -> int:
    # When an error ends training, its preemption handler (a flag, no exit) stays installed
    # until the error's line is printed: the launcher sends SIGTERM to every rank as soon as
    # one has ended, and a rank must not die of it before saying why it stops. The handlers
    # this process had are restored here, after the line.
    signals = [getattr(signal, n) for n in ("SIGTERM", "SIGUSR1") if hasattr(signal, n)]
    saved = {s: signal.getsignal(s) for s in signals}
    try:
        return run_cli(
            "train",
            lambda: run(parse_args(argv)),
            disk_full="free space, then rerun with --resume (the checkpoints written are intact)",
        )
    finally:
        for s, handler in saved.items():
            if handler is not None:
                signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
