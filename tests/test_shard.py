"""`python -m histodist.shard` end to end on fixtures in official layouts (real pixels)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import fixtures_layouts as fx
import numpy as np
import pytest

from histodist import shard


def run(*args, **kw) -> int:
    return shard.main([str(a) for a in args])


def test_folder_readback_tarfile_webdataset_timm(tmp_path, pcam_jpeg):
    src = fx.make_folder(tmp_path / "src", pcam_jpeg, per_class=6)
    out = tmp_path / "out"
    assert (
        run(
            "--dataset",
            "folder",
            "--src",
            src,
            "--out",
            out,
            "--samples-per-shard",
            5,
            "--workers",
            1,
        )
        == 0
    )
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["train"]["class_counts"] == [6, 6]
    assert m["splits"]["valid"]["class_counts"] == [3, 3]
    assert [s["num_samples"] for s in m["splits"]["train"]["shards"]] == [4, 4, 4]  # balanced
    assert m["image"] == {"height": 96, "width": 96, "mode": "RGB"} and m["encoding"] == "original"
    assert all(0.3 < v < 0.9 for v in m["mean"]) and all(0.1 < v < 0.4 for v in m["std"])
    assert m["command"].startswith("python -m histodist.shard --dataset folder")
    train = fx.read_split(out, "train")
    assert len(train) == 12 and all(set(s) == {"jpg", "cls", "json"} for s in train.values())
    key, sample = next(iter(train.items()))
    meta = json.loads(sample["json"])
    assert (src / meta["source"]).read_bytes() == sample["jpg"]  # original bytes kept
    assert meta["label_name"] == sample["cls"].decode() == Path(meta["source"]).parent.name

    import timm.data
    import webdataset as wds

    urls = [str(out / s["name"]) for s in m["splits"]["train"]["shards"]]
    got = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "cls"))
    assert len(got) == 12 and Counter(c for _, c in got) == {0: 6, 1: 6}
    ds = timm.data.create_dataset("wds/x", root=str(out), split="valid")
    assert sorted(t for _, t in ds) == [0, 0, 0, 1, 1, 1]
    info = json.loads((out / "_info.json").read_text())
    assert info["splits"]["train"]["shard_lengths"] == [4, 4, 4]


def test_pcam_h5_gz_png_roundtrip(tmp_path, pcam_jpeg):
    import h5py
    from PIL import Image

    src = fx.make_pcam_h5(tmp_path / "src", pcam_jpeg, gz=True)
    out = tmp_path / "out"
    assert run("--dataset", "pcam", "--src", src, "--out", out, "--cache-dir", tmp_path / "c") == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["encoding"] == "png" and m["group_by"] == "slide"
    assert {s: v["num_samples"] for s, v in m["splits"].items()} == {
        "train": 8,
        "valid": 4,
        "test": 4,
    }
    test = fx.read_split(out, "test")
    with h5py.File(tmp_path / "c" / "camelyonpatch_level_2_split_test_x.h5") as f:
        x = f["x"][:]
    for row in range(4):
        sample = test[f"test_patch{row:07d}"]
        pixels = np.asarray(Image.open(__import__("io").BytesIO(sample["png"])))
        assert np.array_equal(pixels, x[row])  # lossless
        assert json.loads(sample["json"])["wsi"] == f"camelyon16_test_slide_{row % 2:03d}"


def test_pcam_raw_encoding(tmp_path, pcam_jpeg):
    import io

    src = fx.make_pcam_h5(tmp_path / "src", pcam_jpeg, n={"train": 4}, meta=False)
    out = tmp_path / "out"
    assert run("--dataset", "pcam", "--src", src, "--out", out, "--encoding", "raw") == 0
    sample = next(iter(fx.read_split(out, "train").values()))
    arr = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
    assert arr.shape == (96, 96, 3) and arr.dtype == np.uint8


def test_kaggle_real_files(tmp_path, kaggle_mini):
    out = tmp_path / "out"
    src = fx.make_kaggle(tmp_path / "src", kaggle_mini)
    assert run("--dataset", "kaggle-hcd", "--src", src, "--out", out) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert list(m["splits"]) == ["train", "valid", "test"]
    assert m["splits"]["test"]["class_counts"] is None  # the unlabelled Kaggle test set
    assert m["splits"]["train"]["num_samples"] + m["splits"]["valid"]["num_samples"] == 15
    assert all("cls" not in s and "tif" in s for s in fx.read_split(out, "test").values())


def test_idc_split_is_patient_level(tmp_path, pcam_jpeg):
    src = fx.make_idc(tmp_path / "src", pcam_jpeg, patients=10, per_class=2)
    out = tmp_path / "out"
    assert (
        run(
            "--dataset",
            "idc",
            "--src",
            src,
            "--out",
            out,
            "--val-fraction",
            0.2,
            "--test-fraction",
            0.2,
            "--seed",
            1,
        )
        == 0
    )
    m = json.loads((out / "manifest.json").read_text())
    patients = {}
    for split in m["splits"]:
        patients[split] = {
            json.loads(s["json"])["patient"] for s in fx.read_split(out, split).values()
        }
        assert m["splits"][split]["num_groups"] == len(patients[split]) > 0
    assert sum(len(p) for p in patients.values()) == len(set().union(*patients.values())) == 10


def test_breakhis_ham_csv(tmp_path, pcam_jpeg):
    bh = fx.make_breakhis(tmp_path / "bh", pcam_jpeg)
    assert (
        run(
            "--dataset",
            "breakhis",
            "--src",
            bh,
            "--out",
            tmp_path / "o1",
            "--magnification",
            "400X",
            "--val-fraction",
            0.25,
            "--test-fraction",
            0.25,
        )
        == 0
    )
    m = json.loads((tmp_path / "o1" / "manifest.json").read_text())
    assert m["image"]["width"] == 700 and sum(s["num_samples"] for s in m["splits"].values()) == 8
    ham = fx.make_ham(tmp_path / "ham", pcam_jpeg)
    assert (
        run(
            "--dataset",
            "ham10000",
            "--src",
            ham,
            "--out",
            tmp_path / "o2",
            "--val-fraction",
            0.2,
            "--test-fraction",
            0.2,
        )
        == 0
    )
    m = json.loads((tmp_path / "o2" / "manifest.json").read_text())
    assert m["group_by"] == "lesion" and len(m["classes"]) == 7 and m["task"] == "multiclass"
    assert sum(s["num_samples"] for s in m["splits"].values()) == 28
    csv_file = fx.make_csv(tmp_path / "csv", pcam_jpeg, per_class=5)
    assert run("--dataset", "csv", "--src", csv_file, "--out", tmp_path / "o3") == 0
    m = json.loads((tmp_path / "o3" / "manifest.json").read_text())
    assert m["classes"] == ["normal", "tumor"]
    assert [
        sum(c) for c in zip(*(s["class_counts"] for s in m["splits"].values()), strict=True)
    ] == [5, 5]


def test_workers_give_identical_shards_and_rerun_reuses(tmp_path, pcam_jpeg, capsys):
    src = fx.make_folder(tmp_path / "src", pcam_jpeg, per_class=8)
    args = ["--dataset", "folder", "--src", src, "--samples-per-shard", 4]
    assert run(*args, "--out", tmp_path / "a", "--workers", 1) == 0
    assert run(*args, "--out", tmp_path / "b", "--workers", 2) == 0
    ma, mb = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in "ab")
    assert ma["splits"] == mb["splits"]

    shard0 = tmp_path / "a" / "train-000000.tar"
    before = shard0.stat().st_mtime_ns
    (tmp_path / "a" / "train-000001.tar").write_bytes(b"damaged")
    assert run("--verify", tmp_path / "a") == 1
    assert run(*args, "--out", tmp_path / "a", "--workers", 1) == 0
    assert shard0.stat().st_mtime_ns == before  # complete shard skipped
    n = len(list((tmp_path / "a").glob("*.tar")))
    assert f"{n - 1} of {n} shards reused" in capsys.readouterr().out  # all but the damaged one
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["splits"] == ma["splits"]
    assert run("--verify", tmp_path / "a") == 0

    sample = fx.read_split(tmp_path / "a", "train")
    first = json.loads(next(iter(sample.values()))["json"])["source"]  # a train-000000 image
    os.utime(src / first, ns=(before, before + 10**9))  # source edited since: shard redone
    assert run(*args, "--out", tmp_path / "a", "--workers", 1) == 0
    assert shard0.stat().st_mtime_ns != before

    assert run(*args[:-1], 100, "--out", tmp_path / "a", "--workers", 1) == 0  # re-plan
    left = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert left == ["train-000000.tar", "valid-000000.tar"]  # stale shards removed
    assert run("--verify", tmp_path / "a") == 0


def test_verify_names_the_bad_shard(tmp_path, pcam_jpeg, capsys):
    src = fx.make_folder(tmp_path / "src", pcam_jpeg, per_class=4)
    out = tmp_path / "out"
    assert run("--dataset", "folder", "--src", src, "--out", out, "--samples-per-shard", 4) == 0
    (out / "valid-000000.tar").unlink()
    capsys.readouterr()
    assert run("--verify", out) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "valid-000000.tar: shard missing" in err


def test_module_entry_point(tmp_path, kaggle_mini):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "histodist.shard",
        "--dataset",
        "kaggle-hcd",
        "--src",
        str(kaggle_mini),
        "--out",
        str(out),
        "--workers",
        "2",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "train:" in r.stdout and (out / "manifest.json").is_file()
    r = subprocess.run(
        [sys.executable, "-m", "histodist.shard", "--verify", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "verified" in r.stdout


@pytest.mark.parametrize("bad", ["fraction", "official"])
def test_bad_split_options(tmp_path, pcam_jpeg, bad, capsys):
    src = fx.make_folder(tmp_path / "src", pcam_jpeg, per_class=2, splits=bad == "official")
    frac = "1" if bad == "fraction" else "0.2"  # 1.5: argparse refuses it itself
    assert (  # a usage error
        run("--dataset", "folder", "--src", src, "--out", tmp_path / "o", "--val-fraction", frac)
        == 2
    )
    assert "fraction" in capsys.readouterr().err


def test_group_in_two_splits(capsys):
    from histodist.ingest.sources import Item

    a, b = Item("a", "a.png", 0, "p1"), Item("b", "b.png", 1, "p1")
    with pytest.raises(shard.ShardError, match="'p1' is in both the train and valid"):
        shard.check_groups({"train": [a], "valid": [b]}, official=set())
    shard.check_groups({"train": [a], "valid": [b]}, official={"train", "valid"})
    assert "warning: official splits share a group" in capsys.readouterr().err


def test_shard_sizes_are_balanced():
    assert shard.shard_sizes(262_144, 9_039) == [8_739] * 4 + [8_738] * 26  # not 29 + one of 13
    assert shard.shard_sizes(12, 5) == [4, 4, 4] and shard.shard_sizes(3, 10) == [3]
    for n, per in [(1, 1), (7, 2), (1000, 999), (4000, 450)]:
        sizes = shard.shard_sizes(n, per)
        assert sum(sizes) == n and max(sizes) <= per and max(sizes) - min(sizes) <= 1
        assert len(sizes) == -(-n // per)


def test_few_shards_warning_is_one_line(tmp_path, pcam_jpeg, capsys):
    src = fx.make_folder(tmp_path / "src", pcam_jpeg, per_class=6)
    assert run("--dataset", "folder", "--src", src, "--out", tmp_path / "o", "--workers", 1) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "histodist.shard:" in line]
    assert err == [
        "histodist.shard: warning: shards per split: train 1, valid 1, fewer than 32 (8 GPUs x "
        "4 loader workers), so readers share shards and pass over the part before theirs; "
        "--samples-per-shard 1 gives train 12 shards"
    ]
    m = {"splits": {s: {"num_samples": 40 * 64, "shards": [{}] * 40} for s in ("train", "valid")}}
    assert shard.few_shards_warning(m) is None
