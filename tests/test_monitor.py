"""Per log window figures (histodist.training.monitor): the data wait of a starving loader and
the peak memory of a window, measured in real training steps on tiny real PCam shards."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from trainkit import tiny_shards

from histodist import train
from histodist.config import Config, replace
from histodist.training import loop
from histodist.training.monitor import DATA_WAIT, PEAK_RSS, Monitor


class _CPU:
    device = torch.device("cpu")
    num_processes = 1


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_rss_is_the_peak_of_its_window():
    """A 256 MiB block allocated and freed within a window counts in that window's peak and
    not in the next one's."""
    m = Monitor()
    m.restart(_CPU.device)
    block = torch.ones(256 * 2**20 // 4)  # touched, so resident
    del block
    during = m.window(_CPU, 1.0)[PEAK_RSS]
    after = m.window(_CPU, 1.0)[PEAK_RSS]
    assert during > 0.25 and during - after > 0.2, (during, after)


def _parts(shards: Path, runs: Path, **log):
    cfg = replace(
        Config(),
        data={"shards": str(shards), "image_size": 32, "num_classes": 0, "workers": 0},
        augment={"augment": "dihedral"},
        model={"model": "small-cnn"},
        optim={"batch_size": 8, "warmup_epochs": 0.25},
        train={"runs_dir": str(runs), "run_name": "monitor", "epochs": 1, "eval_every": 3},
        log={"wandb": "disabled", "log_images": False, "progress": False, **log},
    )
    return train.setup(cfg)


class SlowLoader:
    """The train loader, each batch `delay` seconds late (a starving input pipeline)."""

    def __init__(self, loader, delay: float):
        self.loader, self.delay = loader, delay

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self):
        for batch in self.loader:
            time.sleep(self.delay)
            yield batch


def test_data_wait_shows_a_starving_loader(tmp_path, pcam_jpeg, monkeypatch):
    """Each batch arrives 0.2 s late: every log line's data wait covers those 0.2 s of its
    window (window = images / images per second), and a step-wise validation (here 3 s)
    is not counted as training time in the next line (the bound leaves a loaded machine room)."""
    p = _parts(tiny_shards(tmp_path / "shards", pcam_jpeg), tmp_path / "runs", log_every=1)
    p.train_loader = SlowLoader(p.train_loader, 0.2)
    monkeypatch.setattr(loop, "validate", lambda p, st: time.sleep(3.0))
    loop.train_one_epoch(p, loop.State())
    p.log.close()
    lines = [json.loads(x) for x in (p.run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [x for x in lines if DATA_WAIT in x]
    assert len(windows) == 8
    for x in windows:
        seconds = 8 / x["train/img_per_s_per_device"]
        assert 0.2 * 0.999 <= x[DATA_WAIT] * seconds <= seconds, (x, seconds)
        assert seconds < 3.0, x  # without the validation's 3 s
        assert 0.05 < x[PEAK_RSS] < 64
