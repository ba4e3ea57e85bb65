"""Bad input: skipped-and-counted images, one-line errors, conversions, no partial shards."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import fixtures_layouts as fx
import numpy as np
import pytest
from PIL import Image

from histodist import shard
from histodist.ingest import imageio
from histodist.ingest.sources import FileReader, Item
from histodist.ingest.writer import ShardTask, write_shard


def run(*args) -> int:
    """histodist.shard's exit code (argparse's own errors raise SystemExit)."""
    try:
        return shard.main([str(a) for a in args])
    except SystemExit as stop:
        return stop.code


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "histodist.shard: error: " in err, err  # argparse's lines start "python -m "
    for n in needles:
        assert n in err, err
    return err


def assert_nothing_written(out: Path) -> None:
    left = [p.name for p in out.glob("*")] if out.exists() else []
    assert not [n for n in left if n.endswith((".tar", ".tmp", ".json"))], left


def test_corrupt_and_truncated_images_are_skipped_and_listed(tmp_path, pcam_jpeg, capsys):
    src = fx.make_folder(tmp_path / "src", pcam_jpeg, per_class=4, splits=False)
    good = next((src / "1").glob("*.jpg")).read_bytes()
    (src / "1" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "0" / "garbage.png").write_bytes(b"\x89PNG not really" * 20)
    out = tmp_path / "out"
    assert run("--dataset", "folder", "--src", src, "--out", out) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert sorted(r["source"] for r in m["rejected"]) == ["0/garbage.png", "1/truncated.jpg"]
    assert sum(s["num_samples"] for s in m["splits"].values()) == 8
    err = capsys.readouterr().err.splitlines()
    warnings = [ln for ln in err if "warning" in ln and "shards per split" not in ln]
    assert len(warnings) == 2 and all("skipped" in w for w in warnings)


def test_unreadable_file_is_rejected(tmp_path, pcam_jpeg):
    src = fx.make_folder(tmp_path / "src", pcam_jpeg, per_class=1, splits=False)
    items = [Item("a", "0/" + next((src / "0").iterdir()).name, 0), Item("b", "0/gone.jpg", 0)]
    rec = write_shard(ShardTask(str(tmp_path), "train-000000.tar", items, FileReader(src), ["0"]))
    assert rec["num_samples"] == 1 and rec["rejected"][0]["source"] == "0/gone.jpg"


def test_conversions_to_8bit_rgb_are_counted(tmp_path, pcam_jpeg):
    src = fx.make_folder(tmp_path / "src", pcam_jpeg, per_class=2, splits=False)
    rgb = np.asarray(Image.open(next((src / "0").iterdir())))
    gray16 = (rgb[..., 0].astype(np.uint16) * 257).astype(np.uint16)
    files = {
        "gray.png": fx.encode(rgb[..., 0]),
        "rgba.png": fx.encode(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])),
        "palette.png": _palette_png(rgb),
        "gray16.png": _png16(gray16),
    }
    for name, data in files.items():
        (src / "1" / name).write_bytes(data)
    out = tmp_path / "out"
    assert (
        run(
            "--dataset",
            "folder",
            "--src",
            src,
            "--out",
            out,
            "--val-fraction",
            0,
            "--test-fraction",
            0,
        )
        == 0
    )
    m = json.loads((out / "manifest.json").read_text())
    assert m["converted"] == {"grayscale": 1, "rgba": 1, "palette": 1, "16bit": 1, "other": 0}
    for key, sample in fx.read_split(out, "train").items():
        if key in ("gray", "rgba", "palette", "gray16"):
            im = Image.open(io.BytesIO(sample["png"]))
            assert im.mode == "RGB" and im.size == (96, 96)
    gray = np.asarray(Image.open(io.BytesIO(fx.read_split(out, "train")["gray16"]["png"])))
    assert np.array_equal(gray[..., 1], rgb[..., 0])  # high byte of the 16-bit values


def _palette_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).quantize(16).save(buf, format="PNG")
    return buf.getvalue()


def _png16(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")  # uint16 -> 16-bit grayscale PNG
    assert buf.getvalue()[24] == 16
    return buf.getvalue()


def test_rgb48_png_counts_as_16bit():
    data = bytearray(fx.encode(np.zeros((4, 4, 3), np.uint8)))
    assert imageio.conversion(Image.open(io.BytesIO(bytes(data))), bytes(data)) is None
    data[24] = 16  # header only: enough for the check
    assert imageio._png_bit_depth(bytes(data)) == 16


def _kaggle(tmp_path, kaggle_mini) -> Path:
    return fx.make_kaggle(tmp_path / "src", kaggle_mini, test_images=0)


def test_missing_labels_file(tmp_path, kaggle_mini, capsys):
    src = _kaggle(tmp_path, kaggle_mini)
    (src / "train_labels.csv").unlink()
    assert run("--dataset", "kaggle-hcd", "--src", src, "--out", tmp_path / "out") == 1
    one_line_error(capsys, "train_labels.csv", "missing")
    assert_nothing_written(tmp_path / "out")


def test_image_without_label(tmp_path, kaggle_mini, capsys):
    src = _kaggle(tmp_path, kaggle_mini)
    first = next((src / "train").glob("*.tif"))
    (src / "train" / ("f" * 40 + ".tif")).write_bytes(first.read_bytes())
    assert run("--dataset", "kaggle-hcd", "--src", src, "--out", tmp_path / "out") == 1
    one_line_error(capsys, "f" * 40 + ".tif", "no label")
    assert_nothing_written(tmp_path / "out")


def test_label_without_image(tmp_path, kaggle_mini, capsys):
    src = _kaggle(tmp_path, kaggle_mini)
    victim = sorted((src / "train").glob("*.tif"))[3]
    victim.unlink()
    assert run("--dataset", "kaggle-hcd", "--src", src, "--out", tmp_path / "out") == 1
    one_line_error(capsys, "train_labels.csv", victim.stem, "no")
    assert_nothing_written(tmp_path / "out")


def test_label_outside_class_list(tmp_path, kaggle_mini, pcam_jpeg, capsys):
    src = _kaggle(tmp_path, kaggle_mini)
    with open(src / "train_labels.csv", newline="") as f:
        rows = list(csv.reader(f))
    rows[5][1] = "2"
    with open(src / "train_labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    assert run("--dataset", "kaggle-hcd", "--src", src, "--out", tmp_path / "out") == 1
    one_line_error(capsys, "train_labels.csv", "line 6", "'2'")

    ham = fx.make_ham(tmp_path / "ham", pcam_jpeg, lesions_per_class=1)
    text = (ham / "HAM10000_metadata.csv").read_text().replace(",vasc,", ",melanoma,")
    (ham / "HAM10000_metadata.csv").write_text(text)
    assert run("--dataset", "ham10000", "--src", ham, "--out", tmp_path / "out") == 1
    one_line_error(capsys, "HAM10000_metadata.csv", "melanoma")


def test_pcam_label_outside_class_list(tmp_path, pcam_jpeg, capsys):
    import h5py

    src = fx.make_pcam_h5(tmp_path / "src", pcam_jpeg, n={"train": 4}, meta=False)
    with h5py.File(src / "camelyonpatch_level_2_split_train_y.h5", "r+") as f:
        f["y"][2] = 2
    assert run("--dataset", "pcam", "--src", src, "--out", tmp_path / "out") == 1
    one_line_error(capsys, "train_y.h5", "row 2", "label 2")


@pytest.mark.parametrize("shape", ["x3d", "ycount", "not-hdf5"])
def test_h5_of_the_wrong_shape(tmp_path, pcam_jpeg, capsys, shape):
    import h5py

    src = fx.make_pcam_h5(tmp_path / "src", pcam_jpeg, n={"train": 4}, meta=False)
    part = "y" if shape == "ycount" else "x"
    path = src / f"camelyonpatch_level_2_split_train_{part}.h5"
    path.unlink()
    if shape == "not-hdf5":
        path.write_bytes(b"<html>quota exceeded</html>")
    else:
        with h5py.File(path, "w") as f:
            if shape == "x3d":
                f["x"] = np.zeros((4, 96, 96), np.uint8)
            else:
                f["y"] = np.zeros((3, 1, 1, 1), np.uint8)
    assert run("--dataset", "pcam", "--src", src, "--out", tmp_path / "out") == 1
    one_line_error(capsys, path.name, "not a readable HDF5" if shape == "not-hdf5" else "expected")
    assert_nothing_written(tmp_path / "out")


def test_empty_source(tmp_path, capsys):
    (tmp_path / "src" / "0").mkdir(parents=True)
    (tmp_path / "src" / "1").mkdir()
    assert run("--dataset", "folder", "--src", tmp_path / "src", "--out", tmp_path / "out") == 1
    one_line_error(capsys, "no images found")
    assert_nothing_written(tmp_path / "out")


def test_unknown_layout_is_a_usage_error(tmp_path, capsys):
    assert run("--dataset", "imagenet", "--src", tmp_path, "--out", tmp_path / "o") == 2
    assert "invalid choice" in capsys.readouterr().err


def test_crash_mid_shard_leaves_no_shard_and_no_manifest(tmp_path, pcam_jpeg, monkeypatch):
    src = fx.make_folder(tmp_path / "src", pcam_jpeg, per_class=4)
    out = tmp_path / "out"
    assert run("--dataset", "folder", "--src", src, "--out", out) == 0
    calls = {"n": 0}
    real = imageio.prepare

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(*a, **kw)

    monkeypatch.setattr(imageio, "prepare", flaky)
    with pytest.raises(RuntimeError):
        run("--dataset", "folder", "--src", src, "--out", out, "--encoding", "png", "--workers", 1)
    names = sorted(p.name for p in out.iterdir())
    assert "manifest.json" not in names and not [n for n in names if n.endswith(".tmp")]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_out_folder_of_user_files_is_refused_and_nothing_is_deleted(tmp_path, pcam_jpeg, capsys):
    src = fx.make_folder(tmp_path / "src", pcam_jpeg, per_class=4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "backup-000001.tar").write_bytes(b"the user's backup")
    (out / "manifest.json").write_text('{"owner": "another tool"}')
    (out / "notes.txt").write_text("keep me")
    before = _files(out)
    args = ["--dataset", "folder", "--src", src, "--out", out, "--samples-per-shard", 4]
    assert run(*args) == 2
    one_line_error(capsys, f"--out {out}", "3 file(s)", "backup-000001.tar", "--overwrite")
    assert _files(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)

    # --overwrite: written beside them; only manifest.json, a name this run writes, is replaced
    assert run(*args, "--overwrite") == 0
    after = _files(out)
    assert after["backup-000001.tar"] == before["backup-000001.tar"]
    assert after["notes.txt"] == before["notes.txt"]
    assert json.loads(after["manifest.json"])["format"].startswith("histodist-shards/")
    assert run("--verify", out) == 0
    # a re-plan into fewer shards deletes the writer's old shards, never the user's files
    assert run(*args[:-1], 100, "--overwrite") == 0
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert tars == ["backup-000001.tar", "train-000000.tar", "valid-000000.tar"]
    assert (out / "backup-000001.tar").read_bytes() == before["backup-000001.tar"]
    assert run(*args[:-1], 100) == 2  # the user's files are still there: still refused


def test_leftovers_of_an_interrupted_run_are_not_foreign(tmp_path, pcam_jpeg, capsys):
    src = fx.make_folder(tmp_path / "src", pcam_jpeg, per_class=4)
    out = tmp_path / "out"
    args = ["--dataset", "folder", "--src", src, "--out", out, "--samples-per-shard", 4]
    assert run(*args, "--workers", 1) == 0
    shards = sorted(p.name for p in out.glob("*.tar"))
    # what a run killed at various instants leaves: no manifest, temporaries, a record whose
    # shard was never renamed into place
    (out / "manifest.json").unlink()
    (out / "_info.json").unlink()
    for name in (".train-000001.tar.k2x_9.tmp", ".manifest.json.a1b2.tmp", "._info.json.zz.tmp"):
        (out / name).write_bytes(b"partial")
    (out / ".shardinfo" / ".train-000000.tar.json.q1.tmp").write_text("{")
    (out / ".shardinfo" / "train-000042.tar.json").write_text("{}")
    capsys.readouterr()
    assert run(*args, "--workers", 1) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*shards, ".shardinfo", "manifest.json", "_info.json"]
    )
    assert sorted(p.name for p in (out / ".shardinfo").iterdir()) == [f"{s}.json" for s in shards]


def test_a_shard_file_never_exists_without_its_record(tmp_path, pcam_jpeg, monkeypatch):
    """The record is written before the shard is renamed into place: a kill between the two
    leaves a record without a shard (rewritten next time), never a shard that looks foreign."""
    import os

    from histodist import fileio

    src = fx.make_folder(tmp_path / "src", pcam_jpeg, per_class=4)
    out, seen, real = tmp_path / "out", [], os.replace

    def replace(a, b):
        if str(b).endswith(".tar"):
            seen.append((out / ".shardinfo" / f"{Path(b).name}.json").is_file())
        return real(a, b)

    monkeypatch.setattr(fileio.os, "replace", replace)
    assert run("--dataset", "folder", "--src", src, "--out", out, "--workers", 1) == 0
    assert seen and all(seen)


@pytest.mark.parametrize(
    "flags, expected",
    [(["--samples-per-shard", 0], "argument --samples-per-shard: 0: must be >= 1"),
     (["--val-fraction", "nan"], "argument --val-fraction: nan: must be a finite number"),
     (["--test-fraction", 1.5], "argument --test-fraction: 1.5: must be in [0, 1]"),
     (["--val-fraction", 0.6, "--test-fraction", 0.4], "split fractions")],
)  # fmt: skip
def test_flags_that_cannot_work_exit_2(tmp_path, pcam_jpeg, capsys, flags, expected):
    src = fx.make_folder(tmp_path / "src", pcam_jpeg, per_class=2, splits=False)
    assert run("--dataset", "folder", "--src", src, "--out", tmp_path / "out", *flags) == 2
    one_line_error(capsys, expected)
    assert_nothing_written(tmp_path / "out")


def _unlistable(monkeypatch, folder: Path) -> None:
    """Make `folder` fail to list as a chmod 000 folder does for a normal user (root reads
    through chmod 000, so the test raises the same PermissionError os.scandir would)."""
    import os

    real = os.scandir

    def scandir(path="."):
        if Path(path) == folder:
            raise PermissionError(13, "Permission denied", str(folder))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_unreadable_class_folder_is_refused_not_dropped(tmp_path, pcam_jpeg, capsys, monkeypatch):
    src = fx.make_folder(tmp_path / "src", pcam_jpeg, per_class=4)
    _unlistable(monkeypatch, src / "valid" / "1")
    out = tmp_path / "out"
    assert run("--dataset", "folder", "--src", src, "--out", out) == 1
    one_line_error(capsys, str(src / "valid" / "1"), "cannot list this folder", "Permission")
    assert_nothing_written(out)
    sub = src / "train" / "0" / "more"  # a folder deeper inside a class folder as well
    sub.mkdir()
    monkeypatch.undo()
    _unlistable(monkeypatch, sub)
    assert run("--dataset", "folder", "--src", src, "--out", out) == 1
    one_line_error(capsys, str(sub), "cannot list this folder")
