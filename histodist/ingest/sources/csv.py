"""`csv`: a CSV file mapping image paths (relative to the CSV) to labels.

Columns are named by `--image-column` / `--label-column` (default `images`, `labels`); an optional
`--group-column` (patient / slide id) makes the split group-aware. Class names are the distinct
labels, numbers in numeric order, otherwise sorted.
"""

from __future__ import annotations

import csv
from pathlib import Path

from histodist.ingest.sources import (
    FileReader,
    Item,
    Scan,
    SourceError,
    SourceOptions,
    sort_classes,
    unique_keys,
)


def scan(src: Path, opts: SourceOptions) -> Scan:
    if not src.is_file():
        raise SourceError(f"{src}: the csv layout needs --src to be the CSV file")
    wanted = [opts.image_column, opts.label_column] + (
        [opts.group_column] if opts.group_column else []
    )
    with open(src, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in wanted if c not in (reader.fieldnames or ())]
        if missing:
            raise SourceError(
                f"{src}: no column {missing[0]!r} (columns: {reader.fieldnames}); "
                "set --image-column / --label-column"
            )
        rows = [(reader.line_num, r) for r in reader]
    root = src.parent
    for line, r in rows:
        if not r[opts.label_column]:
            raise SourceError(f"{src}: line {line}: empty label for {r[opts.image_column]!r}")
        if not (root / r[opts.image_column]).is_file():
            raise SourceError(f"{src}: line {line}: image {r[opts.image_column]!r} not found")
    classes = sort_classes({r[opts.label_column] for _, r in rows})
    rel = [Path(r[opts.image_column]).as_posix() for _, r in rows]
    items = [
        Item(
            key,
            path,
            classes.index(r[opts.label_column]),
            r[opts.group_column] if opts.group_column else None,
        )
        for key, path, (_, r) in zip(unique_keys(rel), rel, rows, strict=True)
    ]
    group_by = opts.group_column if opts.group_column else None
    return Scan(classes, group_by, {}, items, FileReader(root))
