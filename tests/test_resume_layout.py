"""Resume arithmetic at a new layout, in-process: the schedule remap and checkpoints whose
meta predates the position in samples (the multi-process runs are in test_resume_world.py)."""

from types import SimpleNamespace

import pytest
import torch

from histodist.config import OptimConfig, TrainConfig
from histodist.training import resume
from histodist.training.loop import State
from histodist.training.optim import build_scheduler, lr_at, rebase_scheduler, schedule_length

CFG = OptimConfig(lr=0.1, batch_size=8, warmup_epochs=0.5)


def scheduler(peak: float, total: int, warmup: int):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    return build_scheduler(opt, CFG, total_steps=total, warmup_steps=warmup)


def advance(sched, k: int) -> None:
    for _ in range(k):
        sched.optimizer.step()  # no gradients: a no-op, in the order torch expects
        sched.step()


def test_rebase_continues_at_the_position_of_the_new_schedule():
    old = scheduler(0.1, total=16, warmup=4)  # 1 process: 8 steps per epoch
    advance(old, 6)
    # 2 processes: 4 steps per epoch, 8 in all, peak doubled; 6 old steps = 3 new steps.
    rebase_scheduler(old, CFG, peaks=[0.2], total_steps=8, warmup_steps=2, shift=3 - 6)
    lrs = [old.get_last_lr()[0]]
    for _ in range(5):
        advance(old, 1)
        lrs.append(old.get_last_lr()[0])
    assert lrs == pytest.approx([0.2 * lr_at(s, 8, CFG, 2) for s in range(3, 9)])
    assert old.optimizer.param_groups[0]["initial_lr"] == 0.2
    assert lrs[-1] == pytest.approx(0.2 * CFG.min_lr_ratio)  # the schedule ends with the run


def parts(world: int, batches: int, sched):
    cfg = SimpleNamespace(optim=CFG, train=TrainConfig(epochs=2))
    printed = []
    p = SimpleNamespace(
        cfg=cfg,
        accelerator=SimpleNamespace(num_processes=world),
        train_loader=[None] * batches,
        scheduler=SimpleNamespace(scheduler=sched),
        log=SimpleNamespace(print=printed.append),
    )
    return p, printed


def test_old_meta_with_batches_only_resumes_by_samples_at_a_new_world_size():
    meta = {"epoch": 0, "batch_in_epoch": 6, "step": 6, "world_size": 1}  # 1 x 8 x 1 layout
    sched = scheduler(0.1, total=16, warmup=4)
    advance(sched, 6)
    p, printed = parts(world=2, batches=4, sched=sched)
    st = State.from_meta(meta)
    resume.adapt(p, st, meta, peaks=[0.1])
    assert st.samples_in_epoch == 48 and st.samples == 48
    # 64 - 48 samples left = one batch of 2 x 8; the schedule is at 48 / 16 = step 3 of 8.
    assert (st.batch_in_epoch, st.stop_batch) == (0, 1)
    assert st.lr_shift == 3 - 6
    assert schedule_length(CFG, 2, 4) == (8, 2)
    assert "1 process(es) x batch 8" in printed[0] and "1 of 4 batches left" in printed[0]


def test_same_layout_keeps_the_exact_replay():
    meta = {"epoch": 1, "batch_in_epoch": 3, "step": 7, "world_size": 2, "batch_size": 8,
            "accum_steps": 1, "samples_in_epoch": 48}  # fmt: skip
    sched = scheduler(0.1, total=8, warmup=2)
    p, printed = parts(world=2, batches=4, sched=sched)
    st = State.from_meta(meta)
    resume.adapt(p, st, meta, peaks=[0.1])
    assert (st.batch_in_epoch, st.stop_batch, st.lr_shift) == (3, None, 0.0)
    assert printed == [] and sched.lr_lambdas[0].__name__ == "<lambda>"  # untouched
