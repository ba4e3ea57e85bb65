"""`folder`: class-per-folder trees, `<class>/<image>` or `<split>/<class>/<image>`.

Split folders (`train`, `valid` / `val` / `validation`, `test`) are kept as official splits,
`val` and `validation` renamed `valid`. Images lying directly in a split folder with no class
folders (e.g. `test/*.png`) form an unlabelled split. No group ids: none survive in such trees.
"""

from __future__ import annotations

from pathlib import Path

from histodist.ingest.sources import (
    FileReader,
    Item,
    Scan,
    SourceError,
    SourceOptions,
    image_files,
    sort_classes,
    unique_keys,
)

SPLIT_NAMES = {
    "train": "train",
    "valid": "valid",
    "val": "valid",
    "validation": "valid",
    "test": "test",
}


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_files(folder: Path) -> dict[str, list[Path]]:
    """class name -> image files under `folder/<class>/`."""
    return {d.name: image_files(d) for d in _subdirs(folder)}


def scan(src: Path, opts: SourceOptions) -> Scan:
    if not src.is_dir():
        raise SourceError(f"{src}: the folder layout needs a directory")
    dirs = _subdirs(src)
    split_dirs = [d for d in dirs if d.name.lower() in SPLIT_NAMES]
    if split_dirs and len(split_dirs) != len(dirs):
        other = next(d for d in dirs if d not in split_dirs)
        raise SourceError(f"{other}: mixes split folders (train/valid/test) with class folders")
    if not split_dirs:
        per_class = _class_files(src)
        if not per_class:
            raise SourceError(
                f"{src}: no class folders (expected <class>/<image> or <split>/<class>/<image>)"
            )
        classes = sort_classes(per_class)
        files = [(f, classes.index(c)) for c, fs in per_class.items() for f in fs]
        return Scan(classes, None, {}, _items(src, files), FileReader(src))

    per_split = {}
    for d in split_dirs:
        name = SPLIT_NAMES[d.name.lower()]
        if name in per_split:
            raise SourceError(f"{d}: a second folder for split {name!r}")
        per_split[name] = (d, _class_files(d))
    classes = sort_classes({c for _, pc in per_split.values() for c in pc})
    lists: dict[str, list[tuple[Path, int | None]]] = {}
    for name, (d, per_class) in per_split.items():
        if per_class:
            lists[name] = [(f, classes.index(c)) for c, fs in per_class.items() for f in fs]
        else:  # images straight in the split folder: unlabelled (prediction) split
            lists[name] = [(f, None) for f in image_files(d)]
    everything = [pair for pairs in lists.values() for pair in pairs]
    items = iter(_items(src, everything))
    official = {name: [next(items) for _ in pairs] for name, pairs in lists.items()}
    return Scan(classes, None, official, [], FileReader(src))


def _items(src: Path, files: list[tuple[Path, int | None]]) -> list[Item]:
    rel = [f.relative_to(src).as_posix() for f, _ in files]
    keys = unique_keys(rel)
    return [Item(k, r, label) for k, r, (_, label) in zip(keys, rel, files, strict=True)]
