"""Benchmark suite smoke tests: `python -m histodist.bench all --quick` on a few dozen real PCam
images produces a well-formed report. Figures are checked for shape and consistency, never for
speed (speed is what the full run prints, see docs/performance.md)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainkit import subprocess_env

from histodist.bench.common import PeakMemory, measure_interleaved, measure_steps, table

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_pcam(pcam_jpeg, tmp_path_factory) -> tuple[Path, Path]:
    """(images as <split>/<class>/*.jpg, the same images sharded by histodist.shard)."""
    from histodist import shard

    root = tmp_path_factory.mktemp("bench")
    data = root / "data"
    for split, n in (("train", 24), ("valid", 16)):
        for label in ("0", "1"):
            (data / split / label).mkdir(parents=True)
            for p in sorted((pcam_jpeg / split / label).glob("*.jpg"))[:n]:
                shutil.copy(p, data / split / label / p.name)
    shards = root / "shards"
    assert shard.main(["--dataset", "folder", "--src", str(data), "--out", str(shards),
                       "--workers", "1"]) == 0  # fmt: skip
    return data, shards


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_bench_all_quick_report(tiny_pcam, tmp_path):
    data, shards = tiny_pcam
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "histodist.bench", "all", "--quick", "--data", str(data),
           "--shards", str(shards), "--workers", "1", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "histodist benchmark summary" in proc.stdout
    report = json.loads(out.read_text())
    assert set(report["suites"]) == {"shard", "loader", "train"}
    assert report["machine"]["cpus"] >= 1 and len(report["machine"]["load_avg"]) == 3

    t = report["suites"]["train"]["throughput"]
    for key in ("a_ceiling", "b_histodist", "b2_histodist_flips", "c_baseline"):
        r = t[key]
        assert _positive(r["images_per_s"]) and len(r["images_per_s_repeats"]) == 2
        assert 0 <= r["data_wait_ms"] <= r["step_ms"]
        assert r["compute_ms"] == pytest.approx(r["step_ms"] - r["data_wait_ms"], abs=0.02)
        assert _positive(r["main_rss_mb"])
    assert t["b_histodist"]["workers_seen"] >= 1 and _positive(t["b_histodist"]["worker_rss_mb"])
    assert t["c_baseline"]["workers_seen"] >= 1 and _positive(t["c_baseline"]["worker_rss_mb"])
    assert 0 < t["b_histodist"]["augment_ms"] < t["b_histodist"]["step_ms"]
    a, b, c = (t[k]["images_per_s"] for k in ("a_ceiling", "b_histodist", "c_baseline"))
    assert t["pipeline_efficiency_b_over_a"] == pytest.approx(b / a, abs=1e-3)
    assert t["b_over_c"] == pytest.approx(b / c, abs=1e-3)
    assert t["b2_over_c"] == pytest.approx(t["b2_histodist_flips"]["images_per_s"] / c, abs=1e-3)
    for split in t["time_split"].values():
        assert sum(split[k] for k in ("data_wait_pct", "augment_pct", "rest_pct")) == (
            pytest.approx(100.0, abs=0.2)
        )

    tta = report["suites"]["train"]["time_to_accuracy"]
    for key in ("histodist", "baseline"):
        r = tta[key]
        assert r["steps"] >= 1 and r["curve"], r
        assert all(0.0 <= p["auc"] <= 1.0 for p in r["curve"])
        assert r["seconds_to_target"] is not None or r["train_s"] >= tta["budget_s"]

    loader = report["suites"]["loader"]
    assert _positive(loader["a_shards_uint8"]["images_per_s"])
    assert _positive(loader["c_imagefolder_pil"]["images_per_s"])
    assert all(_positive(r["bytes_per_image"]) for r in report["suites"]["shard"]["encodings"])
    rows = report["summary"]
    assert {r["suite"] for r in rows} == {"shard", "loader", "train"}
    assert all(set(r) == {"suite", "figure", "value"} for r in rows)


def test_measure_steps_excludes_warmup_and_splits_wait():
    calls = []

    def step():
        calls.append(1)
        return 8, 0.0

    res = measure_steps(step, device="cpu", warmup=3, repeats=2, steps=4)
    assert len(calls) == 3 + 2 * 4 and res["timed_steps"] == 8
    assert len(res["images_per_s_repeats"]) == 2 and res["data_wait_ms"] == 0.0
    assert res["images_per_s"] > 0


def test_peak_memory_attributes_child_processes_to_their_label():
    with PeakMemory("cpu", interval=0.05) as mem:
        mem.switch("idle")
        time.sleep(0.2)
        mem.switch("spawns")
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.0)"])
        child.wait()
    r = mem.result("spawns")
    assert r["workers_seen"] == 1 and r["worker_rss_mb"] > 0 and r["main_rss_mb"] > 0
    assert mem.result("idle")["workers_seen"] == 0


def test_measure_interleaved_alternates_configurations():
    order = []
    configs = {k: (lambda k=k: order.append(k) or (4, 0.0)) for k in ("a", "b")}
    res = measure_interleaved(configs, device="cpu", warmup=1, repeats=2, steps=2)
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 2
    assert set(res) == {"a", "b"} and all(r["timed_steps"] == 4 for r in res.values())


def test_table_is_markdown_with_missing_cells():
    text = table([{"a": 1.23456, "b": None}, {"a": 12345.0, "b": "x"}], ["a", "b"])
    lines = text.splitlines()
    assert lines[0].startswith("| a") and set(lines[1]) <= {"|", "-"}
    assert "1.23" in lines[2] and "-" in lines[2] and "12,345" in lines[3]
