"""Smoke test of `python -m histodist.bench wsi` on a small synthetic pyramid (figures, no timing asserts)."""

from __future__ import annotations

import json

import pytest

from histodist.bench import wsi as bench_wsi

pytest.importorskip("openslide", reason="the wsi extra (openslide) is not installed")


def test_bench_wsi_runs(tmp_path, pcam_jpeg, capsys):
    out = tmp_path / "figures.json"
    args = ["--slide", str(tmp_path / "absent.svs"), "--pcam", str(pcam_jpeg), "--side", "1024",
            "--tile-size", "64", "--repeats", "1", "--json", str(out)]  # fmt: skip
    assert bench_wsi.main(args) == 0
    (row,) = json.loads(out.read_text())["slides"]
    assert row["slide"] == "synthetic.tif" and row["level"] == 1 and row["read_size"] == 64
    tiles = row["histodist"]["tiles"]
    assert tiles > 0 and row["baseline"]["tiles"] == row["shard"]["tiles"] == tiles
    assert "x_per_core" in capsys.readouterr().out
