"""A small whole-slide reader interface, and its openslide backend.

    with open_slide("slides/a.svs", assume_mpp=None) as s:
        s.dimensions, s.level_downsamples, s.mpp       # (w, h) at level 0, [1.0, 4.0, ...], µm/px
        tile = s.read_region(x, y, level, w, h)        # uint8 (h, w, 3) RGB, x/y in level-0 px
        thumb = s.thumbnail(1024)                      # uint8 (h, w, 3), longest side <= 1024

The tiler uses only this interface, so another backend (tiffslide, cuCIM) is one more class in
BACKENDS. openslide (openslide-python + openslide-bin, the `wsi` extra) is imported on first
use. Transparent pixels (outside the scanned area) are composited on white.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from histodist.errors import HistodistError

# File extensions searched in a slide folder: what openslide reads (DICOM: a folder of .dcm
# files, opened by any one of them, so it is listed per file only when given as --src).
SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
)  # fmt: skip
# Level-0 µm/px outside this range is not a real scan (e.g. a TIFF's default 72 dpi gives
# 353 µm/px): treated as missing.
MPP_RANGE = (0.01, 20.0)
THUMB_CHUNK = 512  # output pixels per side of one region read while building a thumbnail


class SlideError(HistodistError):
    """A slide that cannot be opened or read (corrupt, truncated, unsupported format)."""


class Slide:
    """One open slide. Subclasses set the attributes and implement `_read`.

    `dimensions`: (w, h) at level 0; `level_dimensions`: (w, h) per level; `level_downsamples`:
    level-0 px per level px, increasing; `mpp`: level-0 µm/px (the metadata's, else
    `assume_mpp`, else None); `mpp_source`: "metadata", "assumed" or None.
    """

    backend = ""
    path: Path
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    mpp_source: str | None
    properties: dict[str, str]

    def _read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read_region(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """uint8 (h, w, 3) RGB of the w x h px region of `level` whose top-left corner is
        (x, y) in level-0 px; raises SlideError naming the slide."""
        try:
            return self._read(int(x), int(y), int(level), int(w), int(h))
        except SlideError:
            raise
        except Exception as e:  # backends raise their own types for corrupt data
            raise SlideError(f"{self.path}: cannot read level {level} at ({x}, {y}): {e}") from e

    def best_level(self, downsample: float, tolerance: float = 0.01) -> int:
        """The coarsest level whose downsample is at most `downsample` (x (1 + tolerance): a
        level 1% coarser than asked is used and resized up rather than reading 4x the pixels
        of the level below)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * (1 + tolerance):
                best = i
        return best

    def thumbnail(self, max_side: int) -> np.ndarray:
        """uint8 (h, w, 3) of the whole slide, longest side round(max side / downsample) <=
        max_side. Read from the best level in chunks, box-averaged (so a single-level
        gigapixel slide never sits whole in memory), then resized with antialiasing."""
        from PIL import Image

        w0, h0 = self.dimensions
        ds = max(1.0, max(w0, h0) / max_side)
        size = (max(1, round(w0 / ds)), max(1, round(h0 / ds)))
        level = self.best_level(ds)
        lds = self.level_downsamples[level]
        k = max(1, int(ds / lds))  # integer box reduction at that level, exact across chunks
        lw, lh = self.level_dimensions[level]
        canvas = np.empty((math.ceil(lh / k), math.ceil(lw / k), 3), np.uint8)
        step = THUMB_CHUNK * k
        for cy in range(0, lh, step):
            for cx in range(0, lw, step):
                w, h = min(step, lw - cx), min(step, lh - cy)
                region = self.read_region(round(cx * lds), round(cy * lds), level, w, h)
                small = np.asarray(Image.fromarray(region).reduce(k)) if k > 1 else region
                canvas[cy // k : cy // k + small.shape[0], cx // k : cx // k + small.shape[1]] = (
                    small
                )
        if canvas.shape[1::-1] == size:
            return canvas
        return np.asarray(Image.fromarray(canvas).resize(size, Image.Resampling.LANCZOS))


class OpenSlideSlide(Slide):
    """openslide-python (the `wsi` extra: openslide-python + openslide-bin)."""

    backend = "openslide"

    def __init__(self, path: str | Path, assume_mpp: float | None = None):
        try:
            import openslide
        except ImportError as e:
            raise SlideError(
                "reading slides needs openslide: pip install -e '.[wsi]' "
                "(openslide-python and openslide-bin)"
            ) from e
        self.path = Path(path)
        try:
            self._s = openslide.OpenSlide(str(path))
        except Exception as e:  # OpenSlideUnsupportedFormatError, OpenSlideError, OSError
            kind = type(e).__name__.replace("OpenSlide", "").replace("Error", "") or "error"
            raise SlideError(f"{path}: cannot open ({kind}: {e or 'unsupported format'})") from e
        s = self._s
        self.properties = dict(s.properties)
        self.dimensions = tuple(s.dimensions)
        self.level_dimensions = tuple(tuple(d) for d in s.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in s.level_downsamples)
        self.mpp, self.mpp_source = _resolve_mpp(self.properties, assume_mpp)

    def _read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        im = self._s.read_region((x, y), level, (w, h))
        if im.getchannel("A").getextrema() == (255, 255):  # inside the scan: no compositing
            return np.asarray(im.convert("RGB"))
        return composite_white(np.asarray(im))

    def close(self) -> None:
        self._s.close()


BACKENDS = {"openslide": OpenSlideSlide}


def open_slide(
    path: str | Path, *, backend: str = "openslide", assume_mpp: float | None = None
) -> Slide:
    """Open a slide (a context manager); `assume_mpp` is used only when the file has no µm/px.
    Raises SlideError (the file cannot be read) naming the file."""
    if backend not in BACKENDS:
        raise SlideError(f"unknown slide backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[backend](path, assume_mpp)


def _resolve_mpp(props: dict[str, str], assume: float | None) -> tuple[float | None, str | None]:
    """Level-0 µm/px from openslide's normalised properties (mean of x and y), else `assume`."""
    try:
        mx, my = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
    except (KeyError, ValueError):
        mx = my = float("nan")
    mpp = (mx + my) / 2
    if MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        return mpp, "metadata"
    return (float(assume), "assumed") if assume else (None, None)


def composite_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 (h, w, 4) RGBA (openslide: not premultiplied) -> (h, w, 3) RGB on white."""
    rgb, a = rgba[..., :3], rgba[..., 3:]
    if a.min() == 255:
        return np.ascontiguousarray(rgb)
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a.astype(np.uint16)) + 127) // 255
    return out.astype(np.uint8)


def slide_files(src: Path) -> list[Path]:
    """`src` itself when it is a file, else the slide files under it (recursive, sorted;
    hidden files and folders skipped)."""
    if src.is_file():
        return [src]
    return sorted(
        p
        for p in src.rglob("*")
        if p.suffix.lower() in SLIDE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(src).parts)
    )
