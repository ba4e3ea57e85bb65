"""Region annotations -> the annotated fraction of each tile.

Two formats, coordinates in level-0 pixels:
- GeoJSON as QuPath exports it (a FeatureCollection, a list of Features, or one Feature):
  Polygon and MultiPolygon geometries (holes allowed); the class is
  `properties.classification.name` (or a plain string there); other geometries are ignored.
- ASAP XML as CAMELYON16/17 ship it: `<Annotation PartOfGroup=...>` elements with
  `<Coordinate Order X Y>` children (types Polygon, Spline, Rectangle; dots ignored).

Classes and groups, case-insensitive: TUMOUR (`_0`, `_1`, `Tumor`, `metastases`, ...) add to
the tumour region; EXCLUSION (`_2`, `Exclusion`, ...) are cut out of it (CAMELYON16's normal
islands inside a tumour outline); GeoJSON features without a class count as tumour; any other
class is ignored. A tile's fraction is the tumour-minus-exclusion area inside it over its
area, from a raster of RASTER_PER_TILE x RASTER_PER_TILE cells per tile (pixel centres inside
a ring, even-odd rule for self-intersecting rings): exact for regions on the cell grid,
within one cell row along other edges.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histodist.errors import UsageError
from histodist.ingest.slides.tissue import box_fractions

ANNOTATION_EXTENSIONS = (".geojson", ".json", ".xml")
TUMOUR = frozenset({"_0", "_1", "tumor", "tumour", "metastases", "metastasis"})
EXCLUSION = frozenset({"_2", "exclusion", "exclude", "ignore", "excluded"})
RASTER_PER_TILE = 16

Ring = np.ndarray  # float64 (n, 2) level-0 (x, y)


class AnnotationError(UsageError):
    """An annotation file that cannot be used; the message names the file and the shape."""


@dataclass
class Regions:
    """Polygons (each a list of rings: exterior first, then holes) of one slide."""

    path: Path
    tumour: list[list[Ring]] = field(default_factory=list)
    exclusion: list[list[Ring]] = field(default_factory=list)
    ignored: set[str] = field(default_factory=set)  # class names neither tumour nor exclusion

    def add(self, cls: str | None, rings: list[Ring]) -> None:
        name = (cls or "").strip().lower()
        if not name or name in TUMOUR:
            self.tumour.append(rings)
        elif name in EXCLUSION:
            self.exclusion.append(rings)
        else:
            self.ignored.add(cls)


def load(path: str | Path) -> Regions:
    """Parse one annotation file (by extension); raises AnnotationError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: cannot read annotation file ({e})") from e
    if path.suffix.lower() == ".xml":
        return _asap(path, text)
    return _geojson(path, text)


def _geojson(path: Path, text: str) -> Regions:
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise AnnotationError(f"{path}: not valid JSON ({e})") from e
    if isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        features = obj.get("features", [])
    elif isinstance(obj, dict) and obj.get("type") == "Feature":
        features = [obj]
    elif isinstance(obj, dict) and "coordinates" in obj:  # a bare geometry
        features = [{"geometry": obj, "properties": {}}]
    elif isinstance(obj, list):
        features = obj
    else:
        raise AnnotationError(f"{path}: not GeoJSON (expected a FeatureCollection or Features)")
    regions = Regions(path)
    for i, feat in enumerate(features):
        where = f"{path}: feature {i}"
        if not isinstance(feat, dict) or not isinstance(feat.get("geometry"), dict):
            raise AnnotationError(f"{where}: no geometry")
        geom, props = feat["geometry"], feat.get("properties") or {}
        cls = props.get("classification")
        cls = cls.get("name") if isinstance(cls, dict) else cls
        kind = geom.get("type")
        if kind == "Polygon":
            polygons = [geom.get("coordinates")]
        elif kind == "MultiPolygon":
            polygons = geom.get("coordinates") or []
        else:
            continue  # points, lines: not regions
        for poly in polygons:
            if not isinstance(poly, list) or not poly:
                raise AnnotationError(f"{where}: a polygon without rings")
            regions.add(cls, [_ring(r, where) for r in poly])
    return regions


def _asap(path: Path, text: str) -> Regions:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise AnnotationError(f"{path}: not valid XML ({e})") from e
    regions = Regions(path)
    for i, ann in enumerate(root.iter("Annotation")):
        if ann.get("Type", "Polygon").lower() in ("dot", "pointset", "point"):
            continue
        where = f"{path}: Annotation {ann.get('Name', i)!r}"
        coords = sorted(ann.iter("Coordinate"), key=lambda c: float(c.get("Order", 0)))
        try:
            pts = [[float(c.get("X")), float(c.get("Y"))] for c in coords]
        except (TypeError, ValueError) as e:
            raise AnnotationError(f"{where}: a coordinate without numeric X and Y") from e
        regions.add(ann.get("PartOfGroup"), [_ring(pts, where)])
    return regions


def _ring(points, where: str) -> Ring:
    """float64 (n, 2) of a ring; raises AnnotationError unless it has >= 3 distinct finite
    points enclosing a non-zero area."""
    try:
        ring = np.asarray(points, np.float64)
    except (TypeError, ValueError) as e:
        raise AnnotationError(f"{where}: coordinates are not numbers") from e
    if ring.ndim != 2 or ring.shape[1] < 2:
        raise AnnotationError(f"{where}: coordinates are not a list of [x, y] points")
    ring = ring[:, :2]
    if not np.isfinite(ring).all():
        raise AnnotationError(f"{where}: non-finite coordinates")
    if len(np.unique(ring, axis=0)) < 3:
        raise AnnotationError(f"{where}: a polygon needs 3 distinct points, has {len(ring)}")
    x, y = ring[:, 0], ring[:, 1]
    if abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) < 1e-9:
        raise AnnotationError(f"{where}: a polygon of zero area")
    return ring


def rasterize(polygons: list[list[Ring]], shape: tuple[int, int], cell: float) -> np.ndarray:
    """bool (h, w) raster, `cell` level-0 px per raster pixel, of the union of `polygons`
    (pixel i covers [i*cell, (i+1)*cell): in when its centre is inside)."""
    from skimage.draw import polygon as fill

    out = np.zeros(shape, bool)
    for rings in polygons:
        ext = rings[0] / cell - 0.5
        x0, y0 = np.floor(ext.min(0)).astype(int)
        x1, y1 = np.ceil(ext.max(0)).astype(int) + 1
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, shape[1]), min(y1, shape[0])
        if x0 >= x1 or y0 >= y1:
            continue  # outside the slide
        local = np.zeros((y1 - y0, x1 - x0), bool)
        for k, ring in enumerate(rings):
            r = ring / cell - 0.5
            rr, cc = fill(r[:, 1] - y0, r[:, 0] - x0, shape=local.shape)
            local[rr, cc] = k == 0  # holes (later rings) are cut out
        out[y0:y1, x0:x1] |= local
    return out


def tile_fractions(
    regions: Regions, dimensions: tuple[int, int], x: np.ndarray, y: np.ndarray, extent: int
) -> np.ndarray:
    """float64 (n,) tumour-minus-exclusion fraction of each tile (level-0 corners x, y; side
    `extent`)."""
    if not regions.tumour:
        return np.zeros(len(x))
    cell = extent / RASTER_PER_TILE
    shape = (math.ceil(dimensions[1] / cell), math.ceil(dimensions[0] / cell))
    mask = rasterize(regions.tumour, shape, cell)
    if regions.exclusion:
        mask &= ~rasterize(regions.exclusion, shape, cell)
    return box_fractions(mask, x / cell, y / cell, (x + extent) / cell, (y + extent) / cell)
