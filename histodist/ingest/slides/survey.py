"""One slide's survey: metadata, sha256, tissue mask, tile plan, annotated fractions, QC picture.

A survey is what the shard planner needs of a slide before any tile is read. It is cached in
the output folder (`.slides/<slide id>.json` + `.tiles.npz`, written atomically) under the
slide file's size and mtime and the tiling options, so a re-run, or another rank of a cluster
run, reads it instead of surveying the slide again. A slide that cannot be surveyed (corrupt,
truncated, too coarse for the requested µm/px) gets a record with its `error`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from histodist.fileio import atomic_path, atomic_write, file_digest
from histodist.ingest.slides import annotations as ann
from histodist.ingest.slides.qc import QC_SIDE, qc_picture
from histodist.ingest.slides.reader import SlideError, open_slide
from histodist.ingest.slides.tiling import geometry, grid, mask_fractions, tissue_thumbnail
from histodist.ingest.slides.tissue import tissue_mask

SURVEY_VERSION = 1  # bump when the same options give other tiles: forces new surveys
CACHE_DIR = ".slides"
QC_DIR = "qc"


@dataclass(frozen=True)
class TilingOptions:
    """What decides a slide's tiles (part of every survey's cache key)."""

    mpp: float
    tile_size: int
    min_tissue: float
    assume_mpp: float | None = None
    backend: str = "openslide"


@dataclass(frozen=True)
class SlideJob:
    """One slide to survey: its id, its path relative to `root`, its annotation file."""

    slide_id: str
    root: str
    rel: str
    annotation: str | None = None


def stat_key(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def survey(job: SlideJob, opts: TilingOptions, out: str | Path) -> dict:
    """The slide's survey record (cached in `out`): see `_survey` for the keys."""
    out = Path(out)
    path = Path(job.root) / job.rel
    cached = load_record(out, job.slide_id)
    try:
        key = _cache_key(job, opts, path)
    except OSError as e:
        return {"id": job.slide_id, "path": job.rel, "error": f"cannot read ({e.strerror or e})"}
    if cached is not None and cached.get("key") == key:
        return cached
    sha = cached.get("sha256") if cached and cached.get("stat") == key["stat"] else None
    rec = {"id": job.slide_id, "path": job.rel, "key": key, "stat": key["stat"]}
    try:
        rec["sha256"] = sha or file_digest(path)
        rec["bytes"] = path.stat().st_size
        check_tiff(path)
        rec.update(_survey(job, opts, path, out))
    except (SlideError, ann.AnnotationError) as e:
        rec["error"] = str(e).removeprefix(f"{path}: ")
    except OSError as e:
        rec["error"] = f"cannot read ({e.strerror or e})"
    atomic_write(out / CACHE_DIR / f"{job.slide_id}.json", json.dumps(rec))
    return rec


def _cache_key(job: SlideJob, opts: TilingOptions, path: Path) -> dict:
    annotation = None
    if job.annotation:
        annotation = [job.annotation, stat_key(job.annotation)]
    return {"version": SURVEY_VERSION, "stat": stat_key(path), "options": asdict(opts),
            "annotation": annotation}  # fmt: skip


def _survey(job: SlideJob, opts: TilingOptions, path: Path, out: Path) -> dict:
    """Open the slide, find its tissue and tiles, write tiles (npz) and the QC picture."""
    with open_slide(path, backend=opts.backend, assume_mpp=opts.assume_mpp) as slide:
        g = geometry(slide, mpp=opts.mpp, tile_size=opts.tile_size)
        thumb, thumb_mpp = tissue_thumbnail(slide)
        mask = tissue_mask(thumb, mpp=thumb_mpp)
        x, y = grid(slide.dimensions, g.extent)
        frac = mask_fractions(mask, slide.dimensions, x, y, g.extent)
        keep = frac >= opts.min_tissue
        tiles = {"x": x[keep], "y": y[keep], "tissue": frac[keep].round(4)}
        if job.annotation:
            regions = ann.load(job.annotation)
            tiles["annotated"] = ann.tile_fractions(
                regions, slide.dimensions, tiles["x"], tiles["y"], g.extent
            ).round(4)
        if max(thumb.shape[:2]) < QC_SIDE[0]:  # a small slide: a sharper picture
            thumb = slide.thumbnail(QC_SIDE[0])
        rec = {
            "width": slide.dimensions[0],
            "height": slide.dimensions[1],
            "levels": [[w, h, round(d, 6)] for (w, h), d in
                       zip(slide.level_dimensions, slide.level_downsamples, strict=True)],
            "mpp": round(slide.mpp, 6),
            "mpp_source": slide.mpp_source,
            "vendor": slide.properties.get("openslide.vendor"),
            "level": g.level,
            "read_size": g.read_size,
            "extent": g.extent,
            "tiles": int(keep.sum()),
            "tissue_area_mm2": round(float(mask.sum()) * thumb_mpp**2 / 1e6, 4),
        }  # fmt: skip
    _write_tiles(out / CACHE_DIR / f"{job.slide_id}.tiles.npz", tiles)
    positive = None
    if "annotated" in tiles:
        positive = tiles["annotated"] > 0
    caption = _caption(job, rec, opts)
    qc_picture(out / QC_DIR / f"{job.slide_id}.jpg", thumb, mask, (rec["width"], rec["height"]),
               [(int(a), int(b), g.extent) for a, b in zip(tiles["x"], tiles["y"], strict=True)],
               caption, positive)  # fmt: skip
    return rec


def _caption(job: SlideJob, rec: dict, opts: TilingOptions) -> list[str]:
    levels = ", ".join(f"{d:g}" for *_, d in rec["levels"])
    return [
        f"{job.slide_id}   {rec['width']} x {rec['height']} px   {rec['mpp']:.4g} um/px "
        f"({rec['mpp_source']})   level downsamples {levels}",
        f"{rec['tiles']} tiles of {opts.tile_size} px at {opts.mpp:g} um/px (read {rec['read_size']}"
        f" px at level {rec['level']}, {rec['extent']} px at level 0)   tissue "
        f"{rec['tissue_area_mm2']:.3g} mm2   min tissue {opts.min_tissue:g}",
    ]


def _write_tiles(path: Path, tiles: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **tiles)


def load_record(out: str | Path, slide_id: str) -> dict | None:
    """The cached survey record of a slide, or None."""
    try:
        return json.loads((Path(out) / CACHE_DIR / f"{slide_id}.json").read_text())
    except (OSError, ValueError):
        return None


def load_tiles(out: str | Path, slide_id: str) -> dict[str, np.ndarray]:
    """The planned tiles of a surveyed slide: arrays x, y (int64, level-0 px), tissue and,
    with annotations, annotated (float64 fractions), in (y, x) order."""
    with np.load(Path(out) / CACHE_DIR / f"{slide_id}.tiles.npz") as z:
        return {k: z[k] for k in z.files}


def check_tiff(path: Path) -> None:
    """Raise SlideError when a TIFF-based slide (svs, tif, ndpi, ...) is truncated: a tile or
    strip of some level ends past the end of the file. Other formats pass."""
    import tifffile

    try:
        tf = tifffile.TiffFile(path)
    except Exception:  # not a TIFF (MIRAX, DICOM...) or unreadable: openslide decides
        return
    with tf:
        size = tf.filehandle.size
        for i, page in enumerate(tf.pages):
            ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=True) if n]
            if ends and max(ends) > size:
                raise SlideError(
                    f"{path}: truncated: image {i} has data up to byte {max(ends)}, "
                    f"the file has {size}"
                )
