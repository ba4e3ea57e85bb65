"""`python -m histodist.bench gpu --device cpu`: the GPU check's own code, CI-sized, on tiny real
PCam shards: every section runs, the report is well formed and every named check holds; a
failing check makes the command exit 1 naming it."""

from __future__ import annotations

import json

import pytest

from histodist.bench import gpu


@pytest.fixture(scope="module")
def shards(tiny_pcam_shards):
    return tiny_pcam_shards


@pytest.mark.slow  # ~45 s of CPU: a training run, two evaluations and an export (subprocesses)
def test_cpu_mode_runs_every_section(shards, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    argv = ["--device", "cpu", "--shards", str(shards), "--work", str(tmp_path / "work"),
            "--json", str(out), "--workers", "1"]  # fmt: skip
    rc = gpu.main(argv)
    printed = capsys.readouterr()
    assert rc == 0, printed.out[-3000:] + printed.err[-3000:]
    report = json.loads(out.read_text())
    names = {c["check"] for c in report["checks"]}
    assert names == {"efficiency_32px", "host_syncs_per_step", "largest_batch_32px",
                     "train_runs", "evaluate_auc_matches_cpu", "onnx_parity"}  # fmt: skip
    assert all(c["ok"] for c in report["checks"])
    (row,) = report["throughput"]
    assert row["model_img_s"] > 0 and row["e2e_img_s"] > 0
    assert 0 <= row["data_wait_fraction"] <= 1
    assert report["host_syncs"]["intercepted"] == 0
    assert report["largest_batch"]["largest_batch"] >= 8
    run = report["training_run"]
    assert 0 <= run["best_valid_auc"] <= 1 and run["validations"] >= 2
    assert run["precision"].startswith("# precision ")
    assert report["inference"]["auc_diff"] <= gpu.AUC_TOLERANCE
    assert "checks:" in printed.out


def test_a_failed_check_exits_non_zero_naming_it(shards, tmp_path, capsys, monkeypatch):
    def broken(*_):
        raise RuntimeError("no batch fits")

    monkeypatch.setattr(gpu, "largest_batch", broken)
    monkeypatch.setattr(gpu, "training_run", broken)
    monkeypatch.setattr(gpu, "throughput", lambda *a: [])
    monkeypatch.setattr(gpu, "host_syncs", lambda *a: {})
    argv = ["--device", "cpu", "--shards", str(shards), "--work", str(tmp_path),
            "--json", str(tmp_path / "gpu.json")]  # fmt: skip
    assert gpu.main(argv) == 1
    err = capsys.readouterr().err
    assert "FAILED checks: largest_batch, training_run" in err
