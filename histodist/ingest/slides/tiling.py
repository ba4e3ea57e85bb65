"""The tile grid of a slide at exact µm/px, and its tiles read as arrays.

    tiles = plan_tiles(slide, mpp=0.5, tile_size=224, min_tissue=0.5)   # [Tile], (y, x) order
    for tile, pixels in zip(tiles, read_tiles(slide, tiles, 224)):       # uint8 (224, 224, 3)
        ...

A tile covers `extent` = round(tile_size * mpp / slide.mpp) level-0 px; the grid starts at the
slide's (0, 0) corner, and only whole tiles inside the slide are planned. Each tile is read at
the coarsest level still at least as fine as `mpp` (`read_size` px there) and resized to
`tile_size` with antialiasing, so a 0.25 µm/px slide tiled at 0.5 reads its 2x level when it
has one, else 448 px of level 0.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from histodist.ingest.slides.reader import Slide, SlideError
from histodist.ingest.slides.tissue import THUMB_MPP, box_fractions, tissue_mask

# A slide scanned up to 10% coarser than --mpp is tiled (upsampled that little); beyond, the
# tiles would be blurred enlargements (a 20x scan asked for at 40x) and the slide is refused.
MAX_UPSAMPLE = 1.1
MAX_THUMB_SIDE = 4096  # tissue thumbnails stay under 50 MB even for 100,000 px slides
MIN_THUMB_SIDE = 256
READ_THREADS = 2  # openslide and PIL's resize release the GIL: reads overlap encoding
READ_AHEAD = 16  # regions in flight per slide


@dataclass(frozen=True)
class Tile:
    """Read `read_size` px square at `level` from level-0 (x, y), resize to the tile size;
    `extent`: the tile's side in level-0 px; `tissue`: its tissue fraction in [0, 1]."""

    x: int
    y: int
    level: int
    read_size: int
    extent: int
    tissue: float


@dataclass(frozen=True)
class Geometry:
    """How a slide is tiled at one µm/px: `downsample` level-0 px per tile px."""

    level: int
    read_size: int
    extent: int
    downsample: float


def geometry(slide: Slide, *, mpp: float, tile_size: int) -> Geometry:
    """The level, read size and extent of `tile_size` px tiles at `mpp` µm/px; raises
    SlideError when the slide has no µm/px or is too coarse for `mpp`."""
    if slide.mpp is None:
        raise SlideError(f"{slide.path}: no µm/px in the file; give --assume-mpp M")
    f = mpp / slide.mpp
    if f * MAX_UPSAMPLE < 1:
        raise SlideError(
            f"{slide.path}: level 0 is {slide.mpp:.4g} µm/px, coarser than {mpp:g} µm/px "
            f"(tiles would be upsampled {1 / f:.2f}x)"
        )
    level = slide.best_level(f)
    extent = max(1, round(tile_size * f))
    read = max(1, round(extent / slide.level_downsamples[level]))
    return Geometry(level, read, extent, f)


def tissue_thumbnail(slide: Slide) -> tuple[np.ndarray, float]:
    """(uint8 (h, w, 3) thumbnail at about THUMB_MPP µm/px, its µm/px)."""
    w, h = slide.dimensions
    mpp = slide.mpp or THUMB_MPP  # without µm/px: a guess good enough for a picture
    side = int(np.clip(round(max(w, h) * mpp / THUMB_MPP), MIN_THUMB_SIDE, MAX_THUMB_SIDE))
    thumb = slide.thumbnail(side)
    return thumb, max(w, h) * mpp / max(thumb.shape[:2])


def plan_tiles(
    slide: Slide,
    *,
    mpp: float,
    tile_size: int,
    min_tissue: float,
    mask: np.ndarray | None = None,
) -> list[Tile]:
    """The tiles whose tissue fraction is at least `min_tissue`, in (y, x) order. `mask`: a
    bool tissue mask covering the whole slide at any scale (default: tissue_mask of
    tissue_thumbnail)."""
    g = geometry(slide, mpp=mpp, tile_size=tile_size)
    if mask is None:
        thumb, thumb_mpp = tissue_thumbnail(slide)
        mask = tissue_mask(thumb, mpp=thumb_mpp)
    x, y = grid(slide.dimensions, g.extent)
    frac = mask_fractions(mask, slide.dimensions, x, y, g.extent)
    keep = np.flatnonzero(frac >= min_tissue)
    return [
        Tile(int(x[i]), int(y[i]), g.level, g.read_size, g.extent, round(float(frac[i]), 4))
        for i in keep
    ]


def grid(dimensions: tuple[int, int], extent: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 (n,) level-0 corners x, y of the whole tiles of side `extent`, in (y, x) order."""
    w, h = dimensions
    ys, xs = np.meshgrid(np.arange(h // extent), np.arange(w // extent), indexing="ij")
    return xs.ravel() * extent, ys.ravel() * extent


def mask_fractions(
    mask: np.ndarray, dimensions: tuple[int, int], x: np.ndarray, y: np.ndarray, extent: int
) -> np.ndarray:
    """float64 (n,) fraction of each tile (level-0 corners x, y; side extent) that `mask`
    (bool (h, w) covering the whole slide) covers."""
    sx, sy = mask.shape[1] / dimensions[0], mask.shape[0] / dimensions[1]
    return box_fractions(mask, x * sx, y * sy, (x + extent) * sx, (y + extent) * sy)


def read_tile(slide: Slide, tile: Tile, tile_size: int) -> np.ndarray:
    """uint8 (tile_size, tile_size, 3): the tile's region, resized with antialiasing."""
    from PIL import Image

    region = slide.read_region(tile.x, tile.y, tile.level, tile.read_size, tile.read_size)
    if tile.read_size == tile_size:
        return region
    return np.asarray(
        Image.fromarray(region).resize((tile_size, tile_size), Image.Resampling.LANCZOS)
    )


def read_tiles(
    slide: Slide,
    tiles: Iterable[Tile],
    tile_size: int,
    *,
    threads: int = READ_THREADS,
    ahead: int = READ_AHEAD,
) -> Iterator[np.ndarray]:
    """The tiles' arrays (see read_tile) in order, `ahead` regions read ahead by `threads`
    threads, so that the consumer (encoding, writing) never waits for a decode. A read error
    raises SlideError at its tile."""
    it = iter(tiles)
    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="tiles")
    pending: deque = deque()
    try:
        for t in _take(it, ahead):
            pending.append(pool.submit(read_tile, slide, t, tile_size))
        while pending:
            done = pending.popleft()
            for t in _take(it, 1):
                pending.append(pool.submit(read_tile, slide, t, tile_size))
            yield done.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _take(it: Iterator, n: int) -> list:
    out = []
    for x in it:
        out.append(x)
        if len(out) == n:
            break
    return out


def magnification_mpp(magnification: float) -> float:
    """µm/px of a nominal objective magnification by the usual convention (40x = 0.25,
    20x = 0.5, 10x = 1.0), so that tiles agree across scanners whatever they call 20x."""
    if not math.isfinite(magnification) or magnification <= 0:
        raise ValueError(f"magnification {magnification} must be a positive number")
    return 10.0 / magnification
