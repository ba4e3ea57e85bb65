"""`breakhis`: the BreaKHis v1 tree of 700x460 PNG images, four magnifications.

Layout: `BreaKHis_v1/histology_slides/breast/<benign|malignant>/SOB/<subtype>/<SOB_id>/<MAG>/
SOB_<B|M>_<TYPE>-<YY>-<PATIENT>-<MAG>-<SEQ>.png`. Labels: binary (benign / malignant) or the
8 subtypes (`--breakhis-labels subtype`). The patient id is the group (a patient may appear
under two tumour types, so grouping by patient id alone keeps every patient in one split);
`--magnification 400X` keeps one magnification.
"""

from __future__ import annotations

import re
from pathlib import Path

from histodist.ingest.sources import FileReader, Item, Scan, SourceError, SourceOptions, walk_files

BINARY = ["benign", "malignant"]
SUBTYPES = {  # code -> name, benign first (as in the BreaKHis paper)
    "A": "adenosis",
    "F": "fibroadenoma",
    "PT": "phyllodes_tumor",
    "TA": "tubular_adenoma",
    "DC": "ductal_carcinoma",
    "LC": "lobular_carcinoma",
    "MC": "mucinous_carcinoma",
    "PC": "papillary_carcinoma",
}
NAME = re.compile(
    r"SOB_(?P<bm>[BM])_(?P<type>[A-Z]+)-(?P<year>\d+)-(?P<patient>[0-9A-Za-z]+)"
    r"-(?P<mag>\d+)-(?P<seq>\d+)\.png"
)


def scan(src: Path, opts: SourceOptions) -> Scan:
    if not src.is_dir():
        raise SourceError(f"{src}: the breakhis layout needs a directory")
    subtype = opts.breakhis_labels == "subtype"
    classes = list(SUBTYPES.values()) if subtype else BINARY
    items = []
    for p in sorted(q for q in walk_files(src) if q.match("SOB_*.png")):
        m = NAME.fullmatch(p.name)
        if m is None or m["type"] not in SUBTYPES:
            raise SourceError(f"{p}: not named SOB_<B|M>_<TYPE>-<YY>-<PATIENT>-<MAG>-<SEQ>.png")
        mag = f"{m['mag']}X"
        if p.parent.name.upper() != mag:
            raise SourceError(f"{p}: lies in {p.parent.name}/ but its name says {mag}")
        if opts.magnification and mag != opts.magnification.upper():
            continue
        name = SUBTYPES[m["type"]]
        benign = list(SUBTYPES).index(m["type"]) < 4
        if benign != (m["bm"] == "B"):
            raise SourceError(f"{p}: type {m['type']} does not match {m['bm']}")
        extra = {
            "patient": m["patient"],
            "magnification": mag,
            "subtype": name,
            "tumor_class": BINARY[m["bm"] == "M"],
        }
        label = classes.index(name) if subtype else int(m["bm"] == "M")
        items.append(Item(p.stem, p.relative_to(src).as_posix(), label, m["patient"], extra))
    if not items and opts.magnification:
        raise SourceError(f"{src}: no {opts.magnification} images (magnifications: 40X-400X)")
    return Scan(classes, "patient", {}, items, FileReader(src))
