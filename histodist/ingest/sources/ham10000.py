"""`ham10000`: HAM10000 dermatoscopy images, 7 diagnoses from `HAM10000_metadata.csv`.

Layout: `HAM10000_metadata.csv` (lesion_id, image_id, dx, dx_type, age, sex, localization) and
the images `ISIC_XXXXXXX.jpg` in `HAM10000_images_part_1/`, `HAM10000_images_part_2/` (or any
folder under the source). Several images can show one lesion: the lesion is the group.
"""

from __future__ import annotations

import csv
from pathlib import Path

from histodist.ingest.sources import FileReader, Item, Scan, SourceError, SourceOptions, image_files

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
METADATA = "HAM10000_metadata.csv"
COLUMNS = ("lesion_id", "image_id", "dx")


def read_metadata(path: Path) -> list[dict]:
    if not path.is_file():
        raise SourceError(f"{path}: metadata file missing (it comes with the HAM10000 release)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not set(COLUMNS) <= set(reader.fieldnames or ()):
            raise SourceError(
                f"{path}: expected columns {','.join(COLUMNS)}, found {reader.fieldnames}"
            )
        rows = []
        for row in reader:
            if row["dx"] not in CLASSES:
                raise SourceError(
                    f"{path}: line {reader.line_num}: dx {row['dx']!r} is not one of {CLASSES}"
                )
            rows.append(row)
    return rows


def scan(src: Path, opts: SourceOptions) -> Scan:
    folder = src if src.is_dir() else src.parent
    rows = read_metadata(folder / METADATA)
    files: dict[str, Path] = {}
    for p in image_files(folder):
        files.setdefault(p.stem, p)
    ids = {r["image_id"] for r in rows}
    stray = sorted(set(files) - ids)
    if stray:
        raise SourceError(
            f"{files[stray[0]]}: image has no row in {METADATA} ({len(stray)} such images)"
        )
    missing = sorted(ids - set(files))
    if missing:
        raise SourceError(
            f"{folder / METADATA}: row for {missing[0]!r} but no image file "
            f"({len(missing)} such rows)"
        )
    items = []
    for r in sorted(rows, key=lambda r: r["image_id"]):
        extra = {k: v for k, v in r.items() if k not in ("image_id", "dx") and v is not None}
        extra["lesion"] = extra.pop("lesion_id")
        rel = files[r["image_id"]].relative_to(folder).as_posix()
        items.append(Item(r["image_id"], rel, CLASSES.index(r["dx"]), r["lesion_id"], extra))
    return Scan(CLASSES, "lesion", {}, items, FileReader(folder))
