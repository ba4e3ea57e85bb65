"""Pyramidal tiled TIFF slides built from real PCam patches, with known tissue, levels and labels.

    path = make_slide(tmp / "a.tif", pcam_jpeg, cols=12, rows=8, tissue={(3, 2): 0, (6, 2): 1})

A slide is a white canvas of `cols` x `rows` cells of CELL level-0 px; each cell named in
`tissue` holds one real 96x96 PCam patch of that class, resized to the cell. Levels are written
as TIFF pages (downsamples `levels`, any of them missing on purpose), in one of two layouts
openslide reads with µm/px:
- `generic`: a tiled TIFF whose first page is level 0 and the others have the reduced-resolution
  bit; µm/px from XResolution / YResolution in pixels per centimetre (openslide's generic-tiff);
- `aperio`: an Aperio SVS: ImageDescription `Aperio Image Library ...|MPP = 0.25|AppMag = 40`,
  a stripped thumbnail page after level 0, then the tiled lower levels.
`mpp=None` writes no resolution at all (openslide then has no µm/px). Tiles are deflate
compressed (JPEG needs imagecodecs, which the project does not install).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

CELL = 256  # level-0 px per cell: one tile at 1.0 µm/px of a 0.25 µm/px slide (64 px tiles)
MPP = 0.25


def patches(pcam_jpeg: Path, label: int, n: int) -> list[np.ndarray]:
    """The first `n` real PCam training patches of a class that are tissue to the edges
    (>= 90% of pixels darker than glass: some PCam patches are mostly background),
    uint8 (96, 96, 3)."""
    out = []
    for p in sorted((pcam_jpeg / "train" / str(label)).glob("*.jpg")):
        if len(out) == n:
            break
        px = np.asarray(Image.open(p).convert("RGB"))
        if (px.max(axis=2) < 215).mean() >= 0.9:
            out.append(px)
    return out


def canvas(pcam_jpeg: Path, cols: int, rows: int, tissue: dict[tuple[int, int], int]) -> np.ndarray:
    """uint8 (rows*CELL, cols*CELL, 3): white, with a PCam patch of class c in cell (col, row)
    for every ((col, row), c) of `tissue` (patches taken in order, different per cell)."""
    img = np.full((rows * CELL, cols * CELL, 3), 255, np.uint8)
    pools = {c: patches(pcam_jpeg, c, sum(1 for v in tissue.values() if v == c)) for c in (0, 1)}
    used = {0: 0, 1: 0}
    for (col, row), c in sorted(tissue.items()):
        patch = Image.fromarray(pools[c][used[c]]).resize((CELL, CELL), Image.BILINEAR)
        used[c] += 1
        img[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL] = np.asarray(patch)
    return img


def write_pyramid(
    path: Path,
    img: np.ndarray,
    *,
    mpp: float | None = MPP,
    levels: tuple[int, ...] = (1, 4),
    kind: str = "generic",
) -> Path:
    """Write `img` (level 0) as a tiled pyramidal TIFF (see the module docstring)."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = img.shape[:2]
    common = {"photometric": "rgb", "compression": "zlib", "metadata": None}
    with tifffile.TiffWriter(path) as tw:
        for i, ds in enumerate(levels):
            level = _downsample(img, ds)
            kw = dict(common, tile=(256, 256))
            if kind == "aperio":
                desc = f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] (256x256) RGB"
                if mpp is not None:
                    desc += f"|AppMag = {10 / mpp:g}|MPP = {mpp:.4f}"
                kw["description"] = desc if i == 0 else f"Aperio Image Library level {ds}"
            else:
                kw["subfiletype"] = 0 if i == 0 else 1
                if mpp is not None:
                    kw["resolution"] = (1e4 / (mpp * ds), 1e4 / (mpp * ds))
                    kw["resolutionunit"] = "CENTIMETER"
            tw.write(level, **kw)
            if kind == "aperio" and i == 0:  # the thumbnail page Aperio files carry
                tw.write(_downsample(img, 32), description="Aperio thumbnail", **common)
    return path


def _downsample(img: np.ndarray, ds: int) -> np.ndarray:
    if ds == 1:
        return img
    h, w = img.shape[0] // ds, img.shape[1] // ds
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BOX))


def make_slide(
    path: Path,
    pcam_jpeg: Path,
    *,
    cols: int,
    rows: int,
    tissue: dict[tuple[int, int], int],
    **kw,
) -> Path:
    """A slide of real patches in the `tissue` cells (see canvas, write_pyramid)."""
    return write_pyramid(path, canvas(pcam_jpeg, cols, rows, tissue), **kw)


def block(cols: range, rows: range, label: int = 0) -> dict[tuple[int, int], int]:
    """Every cell of a rectangle of cells, one class."""
    return {(c, r): label for c in cols for r in rows}


def geojson_rect(
    path: Path, x0: float, y0: float, x1: float, y1: float, cls: str = "Tumor"
) -> Path:
    """A QuPath-style GeoJSON FeatureCollection holding one rectangle (level-0 px)."""
    import json

    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    feat = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "annotation", "classification": {"name": cls}}}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feat]}))
    return path


def asap_xml(path: Path, polygons: list[tuple[str, list[tuple[float, float]]]]) -> Path:
    """A CAMELYON16 ASAP XML file: (group, points) per annotation."""
    anns = []
    for i, (group, pts) in enumerate(polygons):
        coords = "".join(
            f'<Coordinate Order="{k}" X="{x}" Y="{y}" />' for k, (x, y) in enumerate(pts)
        )
        anns.append(f'<Annotation Name="Annotation {i}" Type="Polygon" PartOfGroup="{group}" '
                    f'Color="#F4FA58"><Coordinates>{coords}</Coordinates></Annotation>')  # fmt: skip
    groups = "".join(f'<Group Name="{g}" PartOfGroup="None" Color="#ff0000"><Attributes /></Group>'
                     for g in sorted({g for g, _ in polygons}))  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'<?xml version="1.0"?><ASAP_Annotations><Annotations>{"".join(anns)}'
                    f"</Annotations><AnnotationGroups>{groups}</AnnotationGroups></ASAP_Annotations>")  # fmt: skip
    return path


COHORT = [("p1-a", "p1", 1, 4), ("p1-b", "p1", 1, 6), ("p2-a", "p2", 0, 12),
          ("p2-b", "p2", 0, 4), ("p3-a", "p3", 1, 15), ("p4-a", "p4", 0, 6)]  # fmt: skip


def make_cohort(d: Path, pcam_jpeg: Path) -> dict[str, int]:
    """COHORT's 6 slides (name, patient, label, tissue cells) of 4 patients in `d/slides`
    (both layouts, 6 x 6 cells, a tissue block of 4-15 cells each) and their labels by patient
    in `d/slides.csv`; returns slide name -> tissue cells."""
    rows = []
    for i, (name, patient, label, n) in enumerate(COHORT):
        cols = range(1, 4) if n % 3 == 0 else range(1, 3)  # 3 x n/3 or 2 x n/2 cells
        rows_ = range(1, 1 + n // len(cols))
        kind = "aperio" if i % 2 else "generic"
        make_slide(d / "slides" / f"{name}.{'svs' if kind == 'aperio' else 'tif'}", pcam_jpeg,
                   cols=6, rows=6, tissue=block(cols, rows_, label), kind=kind)  # fmt: skip
        rows.append({"slide": name, "label": ["normal", "tumor"][label], "patient": patient})
    with open(d / "slides.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["slide", "label", "patient"])
        w.writeheader()
        w.writerows(rows)
    return {name: n for name, _, _, n in COHORT}
