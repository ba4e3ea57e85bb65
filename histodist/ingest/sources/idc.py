"""`idc`: Breast Histopathology Images (invasive ductal carcinoma), 50x50 PNG patches.

Layout: `<patient>/<0|1>/<patient>_idx5_x<X>_y<Y>_class<C>.png`. The Kaggle archive also holds a
second copy of the tree under `IDC_regular_ps50_idx5/`; files are found recursively and the
copies dropped (same file name). Patients are the groups: a split never shares a patient.
"""

from __future__ import annotations

import re
from pathlib import Path

from histodist.ingest.sources import FileReader, Item, Scan, SourceError, SourceOptions, walk_files

CLASSES = ["0", "1"]  # 1: invasive ductal carcinoma
NAME = re.compile(r"(?P<patient>\d+)_idx5_x(?P<x>\d+)_y(?P<y>\d+)_class(?P<cls>[01])\.png")


def scan(src: Path, opts: SourceOptions) -> Scan:
    if not src.is_dir():
        raise SourceError(f"{src}: the idc layout needs a directory")
    seen: dict[str, Path] = {}
    for p in sorted(q for q in walk_files(src) if q.suffix == ".png"):
        if p.name.startswith("."):
            continue
        m = NAME.fullmatch(p.name)
        if m is None:
            raise SourceError(f"{p}: not named <patient>_idx5_x<X>_y<Y>_class<0|1>.png")
        if p.parent.name != m["cls"] or p.parent.parent.name != m["patient"]:
            raise SourceError(f"{p}: must lie in <patient>/<class>/ = {m['patient']}/{m['cls']}/")
        seen.setdefault(p.name, p)
    items = []
    for name, p in sorted(seen.items()):
        m = NAME.fullmatch(name)
        extra = {"patient": m["patient"], "x": int(m["x"]), "y": int(m["y"])}
        items.append(
            Item(p.stem, p.relative_to(src).as_posix(), int(m["cls"]), m["patient"], extra)
        )
    return Scan(CLASSES, "patient", {}, items, FileReader(src))
