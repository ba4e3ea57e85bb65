"""`kaggle-hcd`: Kaggle Histopathologic Cancer Detection, `train/<id>.tif` + `train_labels.csv`.

`train_labels.csv` has columns `id,label` (label 0/1, 1 = tumour tissue in the centre 32x32).
`test/<id>.tif`, when present, becomes an unlabelled `test` split (for prediction). The images
carry no patient or slide id, so the train split is stratified by class only.
"""

from __future__ import annotations

import csv
from pathlib import Path

from histodist.ingest.sources import FileReader, Item, Scan, SourceError, SourceOptions

CLASSES = ["0", "1"]


def read_labels(path: Path) -> dict[str, int]:
    """id -> label from train_labels.csv; raises SourceError naming the file and row."""
    if not path.is_file():
        raise SourceError(f"{path}: labels file missing (download train_labels.csv from Kaggle)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not {"id", "label"} <= set(reader.fieldnames or ()):
            raise SourceError(f"{path}: expected columns id,label, found {reader.fieldnames}")
        labels = {}
        for row in reader:
            if row["label"] not in CLASSES:
                raise SourceError(
                    f"{path}: line {reader.line_num}: label {row['label']!r} "
                    f"is not one of {CLASSES}"
                )
            labels[row["id"]] = int(row["label"])
    return labels


def scan(src: Path, opts: SourceOptions) -> Scan:
    labels = read_labels(src / "train_labels.csv")
    train_dir = src / "train"
    if not train_dir.is_dir():
        raise SourceError(f"{train_dir}: folder missing (unzip the Kaggle train images there)")
    files = {p.stem: p for p in sorted(train_dir.glob("*.tif"))}
    unlabelled = sorted(set(files) - set(labels))
    if unlabelled:
        raise SourceError(
            f"{files[unlabelled[0]]}: image has no label in train_labels.csv "
            f"({len(unlabelled)} such images)"
        )
    orphans = sorted(set(labels) - set(files))
    if orphans:
        raise SourceError(
            f"{src / 'train_labels.csv'}: label for {orphans[0]!r} but no "
            f"train/{orphans[0]}.tif ({len(orphans)} such labels)"
        )
    pool = [Item(k, f"train/{k}.tif", labels[k]) for k in files]
    tests = [Item(p.stem, f"test/{p.name}", None) for p in sorted(src.glob("test/*.tif"))]
    official = {"test": tests} if tests else {}
    return Scan(CLASSES, None, official, pool, FileReader(src))
