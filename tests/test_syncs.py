"""The training step never waits for the device outside the log interval: the operations that
synchronise on a GPU (`.item()`, `bool(t)`, `.tolist()`, `.cpu()`, `nonzero()`, tensors made from
host data) are intercepted during real training steps on tiny PCam shards with the pcam
augmentation preset, and counted per optimizer step."""

from __future__ import annotations

import torch
from trainkit import tiny_shards

from histodist import train
from histodist.bench.syncs import SyncCounter
from histodist.config import Config, replace
from histodist.training import loop

LOG_EVERY = 3


def _parts(shards, runs_dir, **train_cfg):
    cfg = replace(
        Config(),
        data={"shards": str(shards), "image_size": 32, "num_classes": 0, "workers": 0},
        augment={"augment": "pcam"},  # affine with p = 0.5, HED and colour jitter
        model={"model": "small-cnn"},
        optim={"batch_size": 8, "warmup_epochs": 0.25},
        train={"runs_dir": str(runs_dir), "run_name": "syncs", "epochs": 1, **train_cfg},
        log={"wandb": "disabled", "log_images": False, "progress": False, "log_every": LOG_EVERY},
    )
    return train.setup(cfg)


class Paused:
    """The train loader with the counter paused while a batch is decoded."""

    def __init__(self, loader, counter: SyncCounter):
        self.loader, self.counter = loader, counter

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self):
        it = iter(self.loader)
        while True:
            with self.counter.paused():
                batch = next(it, None)
            if batch is None:
                return
            yield batch


def count_syncs(p, monkeypatch) -> SyncCounter:
    """One epoch of loop.train_one_epoch; buckets: ("step", k) = micro-steps and optimizer
    step k, ("after", k) = its logging, ("end", k) = the end-of-epoch check."""
    counter = SyncCounter()
    after, health = loop.after_step, loop.check_health

    def after_step(p, st, window, bar):
        counter.bucket = ("after", st.step)
        after(p, st, window, bar)
        counter.bucket = ("step", st.step + 1)

    def check_health(p, st):
        bucket = counter.bucket
        counter.bucket = ("after" if bucket[0] == "after" else "end", st.step)
        health(p, st)
        counter.bucket = bucket

    monkeypatch.setattr(loop, "after_step", after_step)
    monkeypatch.setattr(loop, "check_health", check_health)
    p = type(p)(**{**p.__dict__, "train_loader": Paused(p.train_loader, counter)})
    st = loop.State()
    with counter:
        counter.bucket = ("step", 1)
        loop.train_one_epoch(p, st)
    assert st.step == len(p.train_loader) == 8
    return counter


def test_no_host_sync_outside_the_log_interval(tmp_path, pcam_jpeg, monkeypatch):
    shards = tiny_shards(tmp_path / "shards", pcam_jpeg)
    counter = count_syncs(_parts(shards, tmp_path / "runs"), monkeypatch)
    # The first step copies the augmentation's constants to the device, once per device.
    first = [name for bucket, name in counter.events if bucket == ("step", 1)]
    assert set(first) <= {"tensor"} and len(first) <= 4, counter.events
    per_step = {k: counter.counts[("step", k)] for k in range(2, 9)}
    assert per_step == dict.fromkeys(range(2, 9), 0), counter.events
    for k in range(1, 9):
        logged = counter.counts[("after", k)]
        if k % LOG_EVERY:
            assert logged == 0, (k, counter.events)
        else:  # the loss read and the NaN/preemption check: a few reads, once per interval
            assert 1 <= logged <= 4, (k, counter.events)
    assert counter.counts[("end", 8)] <= 2


def test_counter_sees_what_the_loop_used_to_do():
    """The counter is not blind: each operation the loop and augmentation avoid counts."""
    x = torch.rand(4)
    with SyncCounter() as c:
        c.bucket = "b"
        bool(torch.isfinite(x).all())
        x.nonzero()
        torch.tensor([1.0, 2.0])
        torch.tensor([0.0, 1.0]).tolist()
        x.sum().item()
        with c.paused():
            x.sum().item()
    assert c.counts["b"] == 5 + 1  # the tensor whose list is read is made from host data too
    assert [name for _, name in c.events][:2] == ["__bool__", "nonzero"]
