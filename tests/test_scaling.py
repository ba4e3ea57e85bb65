"""The scaling model: formulas, calibration against NVIDIA's published figures, docs in sync."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from histodist.bench import scaling
from histodist.bench.scaling import GPUS, Setup

ROOT = Path(__file__).resolve().parent.parent
A100 = Setup(GPUS["a100"])


def test_one_gpu_reproduces_published_throughput():
    step = scaling.step_ms(A100, 224, 1, 256)
    assert 256 / step * 1e3 == pytest.approx(2470)
    assert scaling.allreduce_ms(A100, 1) == 0 and scaling.ring_volume_mb(A100, 1) == 0


def test_eight_gpus_reproduce_published_strong_scaling():
    # NVIDIA DLE, DGX A100, AMP: 16,621 images/s on 8 GPUs (6.72x of one).
    r = scaling.row(A100, 224, 8, 256, 400)
    assert r["images_s"] == pytest.approx(16_621, rel=0.01)


def test_ring_volume_formula():
    grad_mb = A100.params * 4 / 1e6  # 23.5M fp32 gradients = 94 MB
    assert scaling.ring_volume_mb(A100, 2) == pytest.approx(grad_mb)
    assert scaling.ring_volume_mb(A100, 512) == pytest.approx(2 * 511 / 512 * grad_mb)
    bf16 = Setup(GPUS["a100"], grad_bytes=2)
    assert scaling.ring_volume_mb(bf16, 64) == pytest.approx(scaling.ring_volume_mb(A100, 64) / 2)


def test_allreduce_time_grows_with_nodes_and_shrinks_with_bandwidth():
    t = [scaling.allreduce_ms(A100, n) for n in (2, 8, 16, 64, 512)]
    assert t == sorted(t)
    assert t[1] < 1.0  # one NVLink node: 165 MB at 300 GB/s is about half a millisecond
    fast = Setup(GPUS["a100"], ib_gbit_s=400)
    assert scaling.allreduce_ms(fast, 64) < scaling.allreduce_ms(A100, 64)
    # 8 nodes x 200 Gb/s: 2 * 7/8 * 94 MB / 25 GB/s = 6.6 ms of the inter-node part
    inter = scaling.allreduce_ms(A100, 64) - scaling.allreduce_ms(A100, 8)
    assert inter == pytest.approx(2 * 7 / 8 * A100.params * 4 / 25e9 * 1e3, abs=0.3)


def test_small_images_cost_by_pixel_count():
    per_224 = scaling.ms_per_image(A100, 224)
    assert scaling.ms_per_image(A100, 96) == pytest.approx(per_224 * (96 / 224) ** 2)


def test_capping_the_global_batch_costs_efficiency():
    full = scaling.row(A100, 96, 512, 256, 400)
    capped = scaling.row(A100, 96, 512, 16, 400)
    assert full["steps"] == 262_144 // (512 * 256) == 2  # PCam: two steps per epoch
    assert capped["steps"] == 32
    assert 0 < capped["efficiency"] < full["efficiency"] <= 1


def test_main_prints_tables(capsys):
    assert scaling.main(["--sizes", "96", "--gpus", "1", "8"]) == 0
    out = capsys.readouterr().out
    assert "### 96 px" in out and "| 8 | 256 | 2,048 | 128 |" in out
    assert scaling.main(["--overhead-ms", "1000"]) == 2


def test_docs_show_the_scripts_output(capsys):
    """docs/scaling.md holds the tables `python -m histodist.bench scaling` prints (A100 and H100)."""
    doc = (ROOT / "docs" / "scaling.md").read_text()
    for gpu in ("a100", "h100"):
        scaling.main(["--gpu", gpu])
        rows = [ln for ln in capsys.readouterr().out.splitlines() if re.match(r"\| \d", ln)]
        assert rows and all(r in doc for r in rows), (
            f"re-run python -m histodist.bench scaling --gpu {gpu}"
        )
