"""Layouts: each scanned from a fixture in its exact official layout (real pixels)."""

from __future__ import annotations

from collections import Counter

import fixtures_layouts as fx
import numpy as np
import pytest

from histodist.ingest import sources
from histodist.ingest.sources import Item, SourceError, SourceOptions
from histodist.ingest.sources.split import split_items


def test_folder_with_split_folders(tmp_path, pcam_jpeg):
    scan = sources.scan("folder", fx.make_folder(tmp_path / "d", pcam_jpeg, per_class=4))
    assert scan.classes == ["0", "1"] and scan.group_by is None and not scan.pool
    assert {s: len(v) for s, v in scan.official.items()} == {"train": 8, "valid": 4}
    assert all(it.key == it.source.rsplit("/", 1)[1][:-4] for it in scan.official["train"])
    labels = Counter(it.label for it in scan.official["valid"])
    assert labels == {0: 2, 1: 2}


def test_folder_without_split_folders(tmp_path, pcam_jpeg):
    scan = sources.scan("folder", fx.make_folder(tmp_path / "d", pcam_jpeg, 5, splits=False))
    assert not scan.official and len(scan.pool) == 10


def test_pcam_h5_official_splits_and_slides(tmp_path, pcam_jpeg):
    root = fx.make_pcam_h5(tmp_path / "pcam", pcam_jpeg, gz=True)
    scan = sources.scan("pcam", root, SourceOptions(cache_dir=str(tmp_path / "cache")))
    assert list(scan.official) == ["train", "valid", "test"] and scan.group_by == "slide"
    train = scan.official["train"]
    assert [it.label for it in train] == [0, 1] * 4
    assert train[0].key == "train_patch0000000" and train[0].extra["wsi"].startswith("camelyon16")
    assert (tmp_path / "cache" / "camelyonpatch_level_2_split_train_x.h5").is_file()
    got = list(scan.reader.read(train[2:5]))
    assert [it.key for it, _ in got] == [it.key for it in train[2:5]]
    assert all(a.shape == (96, 96, 3) and a.dtype == np.uint8 for _, a in got)


def test_kaggle_real_files(tmp_path, kaggle_mini):
    scan = sources.scan("kaggle-hcd", fx.make_kaggle(tmp_path / "k", kaggle_mini))
    assert len(scan.pool) == 15 and Counter(it.label for it in scan.pool) == {0: 10, 1: 5}
    assert [it.label for it in scan.official["test"]] == [None, None]


def test_idc_patients(tmp_path, pcam_jpeg):
    scan = sources.scan("idc", fx.make_idc(tmp_path / "idc", pcam_jpeg, patients=3, per_class=2))
    assert scan.group_by == "patient" and len(scan.pool) == 12
    assert {it.group for it in scan.pool} == {"8863", "8964", "9065"}
    it = scan.pool[0]
    assert it.key.endswith(f"class{it.label}") and "." not in it.key


def test_idc_nested_copy_is_deduplicated(tmp_path, pcam_jpeg):
    root = fx.make_idc(tmp_path / "idc", pcam_jpeg, patients=2, per_class=1)
    fx.make_idc(root / "IDC_regular_ps50_idx5", pcam_jpeg, patients=2, per_class=1)
    assert len(sources.scan("idc", root).pool) == 4


def test_breakhis_labels_and_magnification(tmp_path, pcam_jpeg):
    root = fx.make_breakhis(tmp_path / "bh", pcam_jpeg)
    scan = sources.scan("breakhis", root)
    assert scan.classes == ["benign", "malignant"] and len(scan.pool) == 16
    it = next(i for i in scan.pool if i.key == "SOB_B_A-14-22549AB-40-001")
    assert it.label == 0 and it.group == "22549AB" and it.extra["magnification"] == "40X"
    sub = sources.scan(
        "breakhis", root, SourceOptions(magnification="400X", breakhis_labels="subtype")
    )
    assert len(sub.classes) == 8 and len(sub.pool) == 8
    assert sorted(it.label for it in sub.pool) == list(range(8))


def test_ham10000_lesions(tmp_path, pcam_jpeg):
    scan = sources.scan("ham10000", fx.make_ham(tmp_path / "ham", pcam_jpeg, lesions_per_class=2))
    assert scan.classes == fx.HAM_CLASSES and scan.group_by == "lesion"
    assert len(scan.pool) == 7 * 3 and len({it.group for it in scan.pool}) == 14
    assert all(it.key.startswith("ISIC_") for it in scan.pool)


def test_csv_named_labels(tmp_path, pcam_jpeg):
    scan = sources.scan("csv", fx.make_csv(tmp_path / "c", pcam_jpeg, per_class=3))
    assert scan.classes == ["normal", "tumor"] and len(scan.pool) == 6


def test_unknown_layout_and_missing_source(tmp_path):
    with pytest.raises(SourceError, match="unknown layout"):
        sources.scan("imagenet", tmp_path)
    with pytest.raises(SourceError, match="no such file"):
        sources.scan("folder", tmp_path / "absent")


def test_group_split_is_stratified_and_never_shares_a_group():
    items = [Item(f"k{i}", f"{i}.png", i % 2, f"p{i // 4}") for i in range(400)]  # 100 patients
    splits = split_items(items, 2, {"valid": 0.1, "test": 0.2}, seed=3)
    groups = {s: {it.group for it in v} for s, v in splits.items()}
    assert not (
        groups["train"] & groups["valid"]
        or groups["train"] & groups["test"]
        or groups["valid"] & groups["test"]
    )
    assert sum(len(v) for v in splits.values()) == 400
    assert len(splits["valid"]) == 40 and len(splits["test"]) == 80
    assert Counter(it.label for it in splits["test"]) == {0: 40, 1: 40}
    again = split_items(items, 2, {"valid": 0.1, "test": 0.2}, seed=3)
    assert {s: [it.key for it in v] for s, v in again.items()} == {
        s: [it.key for it in v] for s, v in splits.items()
    }
    other = split_items(items, 2, {"valid": 0.1, "test": 0.2}, seed=4)
    assert [it.key for it in other["valid"]] != [it.key for it in splits["valid"]]


def test_folder_val_alias_and_unlabelled_test_folder(tmp_path, pcam_jpeg):
    root = fx.make_folder(tmp_path / "d", pcam_jpeg, per_class=2)
    (root / "valid").rename(root / "val")
    (root / "test").mkdir()
    for p in fx.real_patches(pcam_jpeg, 3, 1, "valid"):
        (root / "test" / p.name).write_bytes(p.read_bytes())
    scan = sources.scan("folder", root)
    assert sorted(scan.official) == ["test", "train", "valid"]
    assert [it.label for it in scan.official["test"]] == [None] * 3
    (root / "extra").mkdir()
    with pytest.raises(SourceError, match="mixes split folders"):
        sources.scan("folder", root)
