"""Smoke test of `python -m histodist.bench shard` on a tiny folder (it prints figures, no timing asserts)."""

from __future__ import annotations

import json

import fixtures_layouts as fx

from histodist.bench import shard as bench_shard


def test_bench_shard_runs(tmp_path, pcam_jpeg, capsys):
    src = fx.make_folder(tmp_path / "src", pcam_jpeg, per_class=5)
    out = tmp_path / "figures.json"
    assert (
        bench_shard.main(["--src", str(src), "--workers", "1", "--limit", "6", "--json", str(out)])
        == 0
    )
    figures = json.loads(out.read_text())
    assert [r["images"] for r in figures["throughput"]] == [14]
    assert {(r["source"], r["encoding"]) for r in figures["encodings"]} == {
        ("folder", "original"),
        ("folder", "png"),
        ("folder", "raw"),
        ("folder", "jpeg"),
        ("pcam", "png"),
        ("pcam", "raw"),
    }
    assert "bytes/img" in capsys.readouterr().out
