"""`pcam`: the official PatchCamelyon HDF5 release, official train / valid / test splits kept.

Files (gzipped `.h5.gz` as downloaded, or gunzipped `.h5`), for split in train, valid, test:
`camelyonpatch_level_2_split_<split>_x.h5` (dataset `x`, uint8 (N, 96, 96, 3)),
`camelyonpatch_level_2_split_<split>_y.h5` (dataset `y`, uint8 (N, 1, 1, 1)) and optionally
`camelyonpatch_level_2_split_<split>_meta.csv` (coord_y, coord_x, tumor_patch,
center_tumor_patch, wsi): the slide id `wsi` becomes each sample's group. Pixels are never loaded
whole (train is 7 GB): workers read contiguous rows in chunks of `CHUNK_ROWS`.
"""

from __future__ import annotations

import csv
import gzip
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from histodist.fileio import atomic_path
from histodist.ingest.sources import (
    Item,
    Payload,
    Reader,
    Scan,
    SourceError,
    SourceOptions,
    stat_signature,
)

SPLITS = ("train", "valid", "test")
CLASSES = ["0", "1"]  # 1: tumour tissue in the centre 32x32 pixels
CHUNK_ROWS = 1024  # 28 MB of pixels per read


def file_name(split: str, part: str) -> str:
    """Official file name, e.g. file_name("train", "x") -> camelyonpatch_level_2_split_train_x.h5."""
    ext = "csv" if part == "meta" else "h5"
    return f"camelyonpatch_level_2_split_{split}_{part}.{ext}"


class H5Reader(Reader):
    """Yields uint8 (96, 96, 3) arrays for items whose source is `<file>.h5:<row>`."""

    bytes_per_sample = 96 * 96 * 3

    def __init__(self, paths: dict[str, str]):
        self.paths = paths  # file name -> absolute path (gunzipped copies may live elsewhere)

    def read(self, items: Sequence[Item]) -> Iterator[tuple[Item, Payload | Exception]]:
        import h5py

        refs = [_parse(it.source) for it in items]
        handles: dict[str, h5py.File] = {}
        try:
            i = 0
            while i < len(items):
                name, row = refs[i]
                j = i + 1
                while j < len(items) and j - i < CHUNK_ROWS and refs[j] == (name, row + j - i):
                    j += 1
                if name not in handles:
                    handles[name] = h5py.File(self.paths[name], "r")
                block = handles[name]["x"][row : row + j - i]
                for k in range(i, j):
                    yield items[k], block[k - i]
                i = j
        finally:
            for h in handles.values():
                h.close()

    def signature(self, items: Sequence[Item]) -> str:
        names = sorted({_parse(it.source)[0] for it in items})
        return stat_signature(self.paths[n] for n in names)


def _parse(source: str) -> tuple[str, int]:
    name, row = source.rsplit(":", 1)
    return name, int(row)


def scan(src: Path, opts: SourceOptions) -> Scan:
    folder = src if src.is_dir() else src.parent
    cache = Path(opts.cache_dir) if opts.cache_dir else folder
    official, paths, grouped = {}, {}, False
    for split in SPLITS:
        x, y = (_locate(folder, file_name(split, p), cache) for p in ("x", "y"))
        if x is None and y is None:
            continue
        if x is None or y is None:
            missing = file_name(split, "x" if x is None else "y")
            raise SourceError(f"{folder / missing}: missing (or its .gz); {split} needs x and y")
        labels = _read_labels(x, y)
        meta = _read_meta(folder / file_name(split, "meta"), len(labels))
        grouped |= meta is not None
        paths[x.name] = str(x)
        official[split] = [
            Item(
                f"{split}_patch{i:07d}",
                f"{x.name}:{i}",
                int(lab),
                meta[i]["wsi"] if meta else None,
                meta[i] if meta else {},
            )
            for i, lab in enumerate(labels)
        ]
    if not official:
        raise SourceError(f"{folder}: no {file_name('train', 'x')}[.gz] (or valid/test) files")
    return Scan(CLASSES, "slide" if grouped else None, official, [], H5Reader(paths), ordered=True)


def _locate(folder: Path, name: str, cache: Path) -> Path | None:
    """The .h5 file, gunzipping `<name>.gz` into `cache` (once, atomically) when needed."""
    if (folder / name).is_file():
        return folder / name
    gz = folder / f"{name}.gz"
    if not gz.is_file():
        return None
    out = cache / name
    if out.is_file() and out.stat().st_mtime >= gz.stat().st_mtime:
        return out
    try:
        with atomic_path(out) as tmp, gzip.open(gz, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 22)
    except (OSError, EOFError) as e:
        raise SourceError(f"{gz}: cannot gunzip ({e}); delete it and download it again") from e
    return out


def _read_labels(x: Path, y: Path) -> np.ndarray:
    """Check shapes and return the (N,) uint8 labels; the pixels are never loaded here."""
    with _open_h5(x) as fx, _open_h5(y) as fy:
        for f, path, name in ((fx, x, "x"), (fy, y, "y")):
            if name not in f:
                raise SourceError(f"{path}: no dataset {name!r}")
        dx, dy = fx["x"], fy["y"]
        if dx.dtype != np.uint8 or dx.ndim != 4 or dx.shape[3] != 3:
            raise SourceError(
                f"{x}: dataset x is {dx.dtype} {dx.shape}, expected uint8 (N, 96, 96, 3)"
            )
        if dy.shape[0] != dx.shape[0] or int(np.prod(dy.shape[1:])) != 1:
            raise SourceError(f"{y}: dataset y is {dy.shape}, expected ({dx.shape[0]}, 1, 1, 1)")
        labels = dy[:].reshape(-1)
    bad = np.flatnonzero(labels > 1)
    if bad.size:
        raise SourceError(f"{y}: row {bad[0]}: label {labels[bad[0]]} is not one of {CLASSES}")
    return labels


def _open_h5(path: Path):
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise SourceError(f"{path}: not a readable HDF5 file ({e})") from e


def _read_meta(path: Path, n: int) -> list[dict] | None:
    """Per-row metadata (wsi, coordinates) from the optional meta CSV."""
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if len(rows) != n or (rows and "wsi" not in rows[0]):
        raise SourceError(f"{path}: expected {n} rows with a wsi column, found {len(rows)}")
    keep = ("wsi", "coord_x", "coord_y", "tumor_patch", "center_tumor_patch")
    return [{k: _value(r[k]) for k in keep if k in r} for r in rows]


def _value(text: str):
    if text.lstrip("-").isdigit():
        return int(text)
    return {"True": True, "False": False}.get(text, text)
