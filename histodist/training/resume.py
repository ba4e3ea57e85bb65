"""Resume at a new layout (world size, per-process batch or accumulation steps).

A checkpoint records where training is in samples as well as in batches. At the layout it was
saved with, a resume replays the epoch's loader order and skips the batches already trained,
so it continues bitwise. At another layout the loader order differs, so the epoch trains the
first `remaining samples // new global micro-batch` batches of the new order; the lr schedule
is re-expressed in steps of the new global batch (and its peak re-scaled by `--lr-scaling`)
so that it ends with the run, as an uninterrupted run at the new layout would.
"""

from __future__ import annotations

from dataclasses import dataclass

from histodist.training.loop import Parts, State
from histodist.training.optim import rebase_scheduler, schedule_length


@dataclass(frozen=True)
class Layout:
    """How a run consumes samples: processes x per-process batch x accumulation steps."""

    world_size: int
    batch_size: int
    accum_steps: int

    @property
    def per_batch(self) -> int:
        """Samples of one micro-batch over all ranks."""
        return self.world_size * self.batch_size

    def describe(self) -> str:
        return (
            f"{self.world_size} process(es) x batch {self.batch_size} x {self.accum_steps} "
            f"accum = global batch {self.per_batch * self.accum_steps}"
        )


def current_layout(p: Parts) -> Layout:
    o = p.cfg.optim
    return Layout(p.accelerator.num_processes, o.batch_size, o.accum_steps)


def saved_layout(meta: dict, now: Layout) -> Layout:
    """The layout a checkpoint was written with (`now`'s batch / accumulation when its meta
    predates those keys)."""
    return Layout(
        int(meta.get("world_size") or now.world_size),
        int(meta.get("batch_size", now.batch_size)),
        int(meta.get("accum_steps", now.accum_steps)),
    )


def peak_lrs(p: Parts) -> list[float]:
    """Each param group's peak lr as built for this run (call before load_state, which
    restores the saved run's)."""
    return [g["initial_lr"] for g in p.optimizer.param_groups]


def adapt(p: Parts, st: State, meta: dict, peaks: list[float]) -> None:
    """Fit a restored State and schedule to this run's layout; prints what changed."""
    now = current_layout(p)
    was = saved_layout(meta, now)
    if "samples_in_epoch" not in meta:  # older meta: batches of the saved layout only
        st.samples_in_epoch = st.batch_in_epoch * was.per_batch
        st.samples = st.step * was.per_batch * was.accum_steps
    total, warmup = schedule_length(p.cfg.optim, p.cfg.train.epochs, len(p.train_loader))
    sched = p.scheduler.scheduler  # accelerate's wrapper holds the LambdaLR
    if was != now:
        n = len(p.train_loader)
        left = max(0, n * now.per_batch - st.samples_in_epoch)
        st.batch_in_epoch, st.stop_batch = 0, left // now.per_batch
        per_epoch = total // max(1, p.cfg.train.epochs)
        position = st.epoch * per_epoch + st.samples_in_epoch / (now.per_batch * now.accum_steps)
        st.lr_shift = position - sched.last_epoch
        old_peak = max(sched.base_lrs)
        p.log.print(
            f"resuming at a new layout: {was.describe()} -> {now.describe()}; epoch "
            f"{st.epoch + 1} has {st.samples_in_epoch} samples done, {st.stop_batch} of {n} "
            f"batches left; lr schedule at step {position:g} of {total}, "
            f"peak lr {old_peak:.4g} -> {max(peaks):.4g}"
        )
    if st.lr_shift or was != now:
        rebase_scheduler(
            sched, p.cfg.optim, peaks=peaks, total_steps=total, warmup_steps=warmup,
            shift=st.lr_shift,
        )  # fmt: skip
