"""Raw dataset layouts -> lists of `Item`s plus a reader that turns items into payloads.

One module per layout (`pcam`, `kaggle_hcd`, `idc`, `breakhis`, `ham10000`, `folder`, `csv`,
`wsi`), each with `scan(src: Path, opts: SourceOptions) -> Scan`. Sources know nothing of tar
files or torch: they list samples (key, where the bytes live, label, group id, metadata)
cheaply, without decoding pixels, and a picklable `Reader` yields the payloads (encoded bytes,
or a uint8 (H, W, 3) array for HDF5 sources and slide tiles) in the parallel shard writers.
The wsi reader's items are slide segments, each expanding into many tile samples.
"""

from __future__ import annotations

import importlib
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from histodist.errors import HistodistError
from histodist.fileio import IMAGE_EXTENSIONS

if TYPE_CHECKING:
    from histodist.ingest.sources.wsi import WsiOptions

LAYOUTS = {
    "pcam": "pcam",
    "kaggle-hcd": "kaggle_hcd",
    "idc": "idc",
    "breakhis": "breakhis",
    "ham10000": "ham10000",
    "folder": "folder",
    "csv": "csv",
    "wsi": "wsi",
}
Payload = bytes | np.ndarray


class SourceError(HistodistError, ValueError):
    """Bad raw input (missing file, unknown label, wrong shape...); the message names the file."""


@dataclass(slots=True)
class Item:
    """One sample, before reading: `source` is a path relative to the source root or `file.h5:row`."""

    key: str
    source: str
    label: int | None
    group: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class SourceOptions:
    """Layout-specific options (only some layouts read each)."""

    magnification: str | None = None  # breakhis: keep one of 40X/100X/200X/400X
    breakhis_labels: str = "binary"  # breakhis: "binary" (benign/malignant) or "subtype" (8)
    image_column: str = "images"  # csv
    label_column: str = "labels"  # csv
    group_column: str | None = None  # csv: optional patient / slide column
    cache_dir: str | None = None  # pcam: where gunzipped .h5 files go
    wsi: WsiOptions | None = None  # wsi: tiling, labels, annotations, ranks (sources.wsi)


class Reader:
    """Yields (item, payload or the OSError that prevented reading it) in item order."""

    def read(self, items: Sequence[Item]) -> Iterator[tuple[Item, Payload | Exception]]:
        raise NotImplementedError

    def signature(self, items: Sequence[Item]) -> str:
        """Changes when the stored data behind `items` changes (size / mtime), for resumes."""
        return ""


def stat_signature(paths) -> str:
    """`size:mtime_ns` of each path (`-` when missing), joined."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append(f"{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            out.append("-")
    return ",".join(out)


class FileReader(Reader):
    """Reads each item's file bytes from `root / item.source`."""

    def __init__(self, root: str | Path):
        self.root = str(root)

    def read(self, items: Sequence[Item]) -> Iterator[tuple[Item, Payload | Exception]]:
        for item in items:
            try:
                yield item, (Path(self.root) / item.source).read_bytes()
            except OSError as e:  # unreadable file: rejected by the writer, not fatal
                yield item, e

    def signature(self, items: Sequence[Item]) -> str:
        return stat_signature(os.path.join(self.root, it.source) for it in items)


@dataclass
class Scan:
    """What a layout found.

    `official`: split name -> items for splits the release defines (kept as they are).
    `pool`: labelled items still to be split by --val-fraction / --test-fraction (may be empty).
    `ordered`: keep item order when sharding (HDF5 rows are read in contiguous chunks).
    `extra`: what a layout adds to the manifest's inputs (wsi: slide surveys, rejected slides).
    """

    classes: list[str]
    group_by: str | None
    official: dict[str, list[Item]]
    pool: list[Item]
    reader: Reader
    ordered: bool = False
    extra: dict = field(default_factory=dict)


def scan(layout: str, src: str | Path, opts: SourceOptions | None = None) -> Scan:
    """Scan `src` in the named layout; raises SourceError on bad input."""
    if layout not in LAYOUTS:
        raise SourceError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    src = Path(src)
    if not src.exists():
        raise SourceError(f"{src}: no such file or folder")
    module = importlib.import_module(f"histodist.ingest.sources.{LAYOUTS[layout]}")
    found: Scan = module.scan(src, opts or SourceOptions())
    items = [it for its in found.official.values() for it in its] + found.pool
    if not items:
        raise SourceError(f"{src}: no images found for layout {layout!r}")
    check_keys(items, src)
    return found


def check_keys(items: Sequence[Item], src: Path) -> None:
    """Keys must be unique and dot-free (WebDataset splits member names at the first dot)."""
    dup = [k for k, n in Counter(it.key for it in items).items() if n > 1]
    if dup:
        raise SourceError(f"{src}: {len(dup)} duplicate sample keys, e.g. {dup[0]!r}")
    bad = [it.key for it in items if not re.fullmatch(r"[A-Za-z0-9_\-]+", it.key)]
    if bad:
        raise SourceError(f"{src}: invalid sample key {bad[0]!r}")


def clean_key(name: str) -> str:
    """A dot-free key from a file stem or relative path: odd characters become `_`."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name)


def unique_keys(rel_paths: Sequence[str]) -> list[str]:
    """File stems as keys when they are unique, else the relative path without extension."""
    stems = [clean_key(Path(p).stem) for p in rel_paths]
    if len(set(stems)) == len(stems):
        return stems
    return [clean_key(str(Path(p).with_suffix("")).replace("/", "__")) for p in rel_paths]


def sort_classes(names: set[str] | Sequence[str]) -> list[str]:
    """Numeric class names in numeric order ("2" < "10"), others alphabetically."""
    names = set(names)
    if all(n.isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def walk_files(folder: Path, *, hidden: bool = True) -> Iterator[Path]:
    """Every file below `folder` (symlinked folders are not entered), in no set order.
    A folder that cannot be listed raises SourceError naming it: Path.rglob skips it without a
    word, which dropped an unreadable class folder from the split. `hidden`: also enter hidden
    folders and yield hidden files."""

    def unreadable(e: OSError) -> None:
        raise SourceError(
            f"{e.filename}: cannot list this folder ({e.strerror}); fix its permissions or "
            "move it out of --src"
        )

    for root, dirs, files in os.walk(folder, onerror=unreadable):
        if not hidden:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            files = [f for f in files if not f.startswith(".")]
        yield from (Path(root) / f for f in files)


def image_files(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted, hidden files and folders skipped;
    raises SourceError on a folder that cannot be listed."""
    return sorted(
        p
        for p in walk_files(folder, hidden=False)
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
