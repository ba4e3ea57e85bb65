"""Tissue detection on a slide thumbnail, with no per-dataset thresholds.

H&E tissue is coloured and the glass around it is not: the mask is the thumbnail's HSV
saturation above Otsu's threshold, clamped to [SAT_MIN, SAT_MAX] (a slide of nearly all tissue
must not have its pale stroma split off as background, an empty slide must not make tissue of
JPEG noise), then cleaned up with sizes in µm, not pixels, so that they mean the same on every
slide: a closing (bridges gaps between cells), an opening (drops specks), holes below
HOLE_UM2 filled, objects below MIN_OBJECT_UM2 removed. Pen ink is coloured too and is kept as
tissue; the QC picture shows it.
"""

from __future__ import annotations

import numpy as np

THUMB_MPP = 4.0  # µm per thumbnail pixel that histodist's own thumbnails aim at
# Bounds of the Otsu threshold on saturation (0..1). On the two real slides glass is at
# 0.01-0.02 and Otsu lands at 0.21-0.26, inside the tissue's spread; 0.15 keeps pale stroma.
SAT_MIN, SAT_MAX = 0.05, 0.15
CLOSE_UM = 12.0  # closing radius
OPEN_UM = 8.0  # opening radius
HOLE_UM2 = 20_000.0  # holes smaller than this (0.02 mm2: nuclei-free gaps, fat cells) are filled
MIN_OBJECT_UM2 = 10_000.0  # tissue pieces smaller than 0.01 mm2 (dust, debris) are removed


def saturation(thumb: np.ndarray) -> np.ndarray:
    """float32 (h, w) HSV saturation in [0, 1] of uint8 (h, w, 3) RGB."""
    rgb = thumb.astype(np.float32)
    hi, lo = rgb.max(axis=2), rgb.min(axis=2)
    return np.where(hi > 0, (hi - lo) / np.maximum(hi, 1), 0).astype(np.float32)


def threshold(sat: np.ndarray) -> float:
    """Otsu's threshold of the saturation values, clamped to [SAT_MIN, SAT_MAX]."""
    from skimage.filters import threshold_otsu

    if sat.size == 0 or float(sat.max()) == float(sat.min()):
        return SAT_MIN
    return float(np.clip(threshold_otsu(sat), SAT_MIN, SAT_MAX))


def tissue_mask(thumb: np.ndarray, *, mpp: float | None = None) -> np.ndarray:
    """bool (h, w) tissue mask of a uint8 (h, w, 3) RGB thumbnail whose pixels are `mpp` µm
    wide (None: THUMB_MPP, what `histodist.ingest.slides.survey` reads)."""
    from scipy import ndimage

    um = THUMB_MPP if mpp is None else float(mpp)
    sat = ndimage.median_filter(saturation(thumb), size=3)  # JPEG ringing, isolated pixels
    mask = sat > threshold(sat)
    close_r, open_r = round(CLOSE_UM / um), round(OPEN_UM / um)
    if close_r >= 1:  # padded first, so that the closing does not erode from the border
        mask = ndimage.binary_closing(np.pad(mask, close_r), disk(close_r))
        mask = mask[close_r:-close_r, close_r:-close_r]
    if open_r >= 1:
        mask = ndimage.binary_opening(mask, disk(open_r))
    holes = ~mask & ~_small_components(~mask, 0, border=True)  # background reaching the edge
    mask = mask | _small_components(holes, HOLE_UM2 / um**2)
    return mask & ~_small_components(mask, MIN_OBJECT_UM2 / um**2)


def disk(radius: int) -> np.ndarray:
    """bool (2r+1, 2r+1) disk footprint."""
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx * xx + yy * yy <= radius * radius


def _small_components(mask: np.ndarray, below: float, border: bool = False) -> np.ndarray:
    """The 8-connected components of `mask` smaller than `below` pixels (or, with `border`,
    those touching the image border, whatever their size)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros_like(mask)
    if border:
        edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        pick = np.zeros(n + 1, bool)
        pick[edge] = True
    else:
        pick = np.bincount(labels.ravel(), minlength=n + 1) < below
    pick[0] = False
    return pick[labels]


def box_fractions(
    mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray
) -> np.ndarray:
    """float64 (n,) mean of `mask` (h, w) over each box [x0, x1) x [y0, y1), in mask pixels,
    fractional edges included: the summed-area table is bilinear inside each pixel, so
    interpolating it at fractional corners integrates the piecewise-constant mask exactly."""
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), np.float64)
    sat[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)

    def at(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x, y = np.clip(x, 0, w), np.clip(y, 0, h)
        xi, yi = (
            np.minimum(np.floor(x).astype(int), w - 1),
            np.minimum(np.floor(y).astype(int), h - 1),
        )
        fx, fy = x - xi, y - yi
        top = sat[yi, xi] * (1 - fx) + sat[yi, xi + 1] * fx
        bottom = sat[yi + 1, xi] * (1 - fx) + sat[yi + 1, xi + 1] * fx
        return top * (1 - fy) + bottom * fy

    area = np.maximum((x1 - x0) * (y1 - y0), 1e-12)
    return np.clip((at(x1, y1) - at(x0, y1) - at(x1, y0) + at(x0, y0)) / area, 0.0, 1.0)
