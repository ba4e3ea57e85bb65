"""The learning-rate range test runs training's own setup and step (CPU, tiny real shards)."""

import json
import re

import pytest
import torch
from trainkit import TINY, run_flags

from histodist import lr_find, train
from histodist.config import OptimConfig
from histodist.training import loop
from histodist.training.optim import scaled_lr

# Every option the range test used to ignore: smoothing, clipping, class-balanced resampling,
# a crop, channels_last, accumulation.
OPTIONS = ["--label-smoothing", "0.1", "--grad-clip", "0.5", "--class-balance", "sampler",
           "--crop", "0.75", "--channels-last", "--accum-steps", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def shards(tiny_pcam_shards):
    return tiny_pcam_shards


def _spy(monkeypatch, module, name: str, calls: list):
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


def test_range_test_runs_the_training_step_with_its_options(shards, tmp_path, monkeypatch, capsys):
    """Every step is accum_steps micro-steps (gradients synced on the last) and one optimizer
    step of histodist.training.loop, the lr of the largest group grows geometrically from
    --start-lr to --end-lr, the suggestion is printed as the unscaled --lr, and nothing but
    the plot is left behind."""
    micro, steps, plotted = [], [], []
    _spy(monkeypatch, loop, "micro_step", micro)
    _spy(monkeypatch, loop, "optimizer_step", steps)
    _spy(monkeypatch, lr_find, "plot", plotted)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    out, n, start, end = tmp_path / "lr.png", 8, 1e-4, 1e-2
    args = ["--shards", str(shards), *TINY, *OPTIONS, "--lr-scaling", "linear",
            "--start-lr", str(start), "--end-lr", str(end), "--num-steps", str(n),
            "--out", str(out)]  # fmt: skip
    assert lr_find.main(args) == 0

    (lrs, losses, suggested, _), _ = plotted[0]
    factor = (end / start) ** (1 / (n - 1))
    assert lrs == pytest.approx([start * factor**i for i in range(len(lrs))], rel=1e-9)
    assert len(lrs) >= 4 and len(losses) == len(lrs)
    assert len(steps) == len(lrs) and len(micro) == 2 * len(lrs)
    assert [m[0][3] for m in micro] == [False, True] * len(lrs)  # sync on the window's last
    p = micro[0][0][0]
    assert p.criterion.label_smoothing == 0.1 and p.sample_weights is not None
    assert p.cfg.optim.grad_clip == 0.5 and p.cfg.augment.crop == 0.75
    conv = next(m for m in p.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # linear scaling: batch 8 x 1 process x 2 accumulation = 16 -> applied lr = --lr x 16/256
    line = capsys.readouterr().out
    flag, applied = map(float, re.search(r"--lr (\S+) \(applied peak lr (\S+)\)", line).groups())
    assert applied == pytest.approx(suggested, rel=1e-2)
    assert flag == pytest.approx(applied * 16, rel=1e-2)
    assert out.stat().st_size > 1000 and list(scratch.iterdir()) == []


# A constant lr has no slope for `suggest` to take over log(lr): numpy warns, the test ignores it.
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
def test_range_test_losses_are_the_training_losses(shards, tmp_path, monkeypatch):
    """At a constant lr the range test's per-step losses are those a training run logs with
    the same options: same data order, seeds, augmentation, loss and optimizer step."""
    lr = "0.003"
    common = [*OPTIONS, "--deterministic", "--seed", "5"]
    args = [*run_flags(shards, tmp_path, "t"), *common, "--epochs", "1",
            "--schedule", "constant", "--warmup-epochs", "0"]  # fmt: skip
    assert train.main(args) == 0
    lines = (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()
    trained = [x["train/loss"] for x in map(json.loads, lines) if "train/loss" in x]
    assert len(trained) == 4  # 8 micro-batches, 2 per step

    windows = []
    _spy(monkeypatch, loop, "optimizer_step", windows)
    found = ["--shards", str(shards), *TINY, *common, "--start-lr", lr, "--end-lr", lr,
             "--num-steps", "4", "--out", str(tmp_path / "lr.png")]  # fmt: skip
    assert lr_find.main(found) == 0
    ranged = [torch.stack(a[2].since_log).mean().item() for a, _ in windows]
    assert ranged == pytest.approx(trained, rel=1e-4)


def test_suggestion_is_the_lr_flag_before_scaling():
    """With --lr-scaling linear on 4 processes (global batch 8 x 4 x 2 = 64 of 256) training
    applies --lr / 4; the range test's applied lr converts back to the --lr to pass."""
    o = OptimConfig(lr=0.01, batch_size=8, accum_steps=2, lr_scaling="linear")
    assert scaled_lr(o, 4) == pytest.approx(0.0025)
    assert lr_find.lr_flag(0.0025, o, 4) == pytest.approx(0.01)
    assert lr_find.lr_flag(0.001, o, 4) == pytest.approx(0.004)
    assert lr_find.lr_flag(0.001, o, 1) == pytest.approx(0.016)  # 16 of 256
    # a backbone group at 2x the head's lr is the largest: its lr is 2 x the scaled --lr
    assert lr_find.lr_flag(0.005, o, 4, top_scale=2.0) == pytest.approx(0.01)
    plain = OptimConfig(lr=0.01, lr_scaling="none")
    assert lr_find.lr_flag(0.001, plain, 8) == pytest.approx(0.001)


@pytest.mark.parametrize(
    "flags, expected",
    [(["--start-lr=nan"], "--start-lr nan"), (["--end-lr=inf"], "--end-lr inf"),
     (["--start-lr=-1e-5"], "--start-lr"), (["--start-lr=1", "--end-lr=0.1"], ">= --start-lr"),
     (["--num-steps=0"], "--num-steps 0")],
)  # fmt: skip
def test_sweep_flags_that_cannot_work_are_one_line_exit_2(flags, expected, tmp_path, capsys):
    assert lr_find.main([*flags, "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("histodist.lr_find: error: ") and expected in err and err.count("\n") == 1
