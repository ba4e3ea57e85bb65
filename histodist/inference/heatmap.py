"""Slide heatmaps: a MIL head's per-tile scores drawn over the slide's thumbnail.

    values = score_map(thumb.shape[:2], coords, extents, scores, level0_size=(W, H))
    save_heatmap("s1.png", thumb, coords, extents, scores, level0_size=(W, H),
                 read_tile=lambda i: tile_pixels(i), title="s1: P(tumour) 0.97")

Inputs: the thumbnail, uint8 (h, w, 3) RGB; each tile's top-left corner (x, y) and side in
level-0 pixels (the tile JSON's x, y, extent: histodist.data.bags.Bag.coords / extents); one
score per tile (attention, or an instance probability), and the slide's level-0 size.
Attention is heavy-tailed (a few tiles take most of it), so by default scores are drawn as
their percentile rank among the slide's tiles (`scale="rank"`, as CLAM's heatmaps); instance
probabilities are drawn as they are (`scale="none"`). The figure: the thumbnail, the overlay
with a colour bar and the most-attended tiles numbered on it, and those tiles enlarged
beneath, each with its score and position. numpy in, PNG out (matplotlib's Agg backend).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from histodist.inference.report import figure, save_figure

SCALES = {"rank": "percentile of the slide's tiles", "minmax": "min-max scaled", "none": None}
PER_ROW = 8  # top tiles per row beneath the heatmap


def scaled(scores: np.ndarray, scale: str = "rank") -> np.ndarray:
    """Scores (N,) -> float64 (N,) in [0, 1]: percentile rank (ties share one), min-max, or
    as they are (clipped; for probabilities)."""
    s = np.asarray(scores, dtype=np.float64)
    if scale == "rank":
        if len(s) < 2:
            return np.ones_like(s)
        ranks = np.searchsorted(np.sort(s), s, side="right") - 1
        return ranks / (len(s) - 1)
    if scale == "minmax":
        span = s.max() - s.min() if len(s) else 0.0
        return (s - s.min()) / span if span > 0 else np.ones_like(s)
    if scale == "none":
        return np.clip(s, 0.0, 1.0)
    raise ValueError(f"scale must be one of {', '.join(SCALES)}, not {scale!r}")


def score_map(
    shape: tuple[int, int],
    coords: np.ndarray,
    extents: np.ndarray,
    values: np.ndarray,
    *,
    level0_size: tuple[int, int],
) -> np.ndarray:
    """float32 (h, w) at thumbnail resolution: each pixel the mean value of the tiles covering
    it, NaN where none does. coords int (N, 2) level-0 (x, y); extents (N,) level-0 sides."""
    h, w = shape
    sx, sy = w / level0_size[0], h / level0_size[1]
    total = np.zeros((h, w), np.float64)
    count = np.zeros((h, w), np.int32)
    for (x, y), e, v in zip(np.asarray(coords), np.asarray(extents), values, strict=True):
        x0, y0 = int(np.floor(x * sx)), int(np.floor(y * sy))
        x1, y1 = max(x0 + 1, int(np.ceil((x + e) * sx))), max(y0 + 1, int(np.ceil((y + e) * sy)))
        total[max(0, y0) : y1, max(0, x0) : x1] += v
        count[max(0, y0) : y1, max(0, x0) : x1] += 1
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def overlay(thumb: np.ndarray, values: np.ndarray, *, cmap: str = "turbo",
            alpha: float = 0.5) -> np.ndarray:  # fmt: skip
    """uint8 (h, w, 3): the thumbnail with `values` (in [0, 1], NaN: no tile) in the colour
    map blended over it at `alpha`; uncovered pixels keep the thumbnail's."""
    import matplotlib

    rgb = matplotlib.colormaps[cmap](np.nan_to_num(values))[..., :3]
    covered = ~np.isnan(values)[..., None]
    mixed = (1 - alpha) * thumb.astype(np.float64) / 255 + alpha * rgb
    out = np.where(covered, mixed, thumb.astype(np.float64) / 255)
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)


def save_heatmap(
    path: str | Path,
    thumb: np.ndarray,
    coords: np.ndarray,
    extents: np.ndarray,
    scores: np.ndarray,
    *,
    level0_size: tuple[int, int],
    read_tile: Callable[[int], np.ndarray] | None = None,
    top: int = 8,
    title: str = "",
    label: str = "attention",
    scale: str = "rank",
    cmap: str = "turbo",
) -> Path:
    """PNG: thumbnail | overlay with colour bar and the `top` highest-scored tiles numbered;
    beneath, those tiles (`read_tile(i)` -> uint8 (h, w, 3) of tile i; left out when None)."""
    plt = figure()
    values = scaled(scores, scale)
    heat = score_map(thumb.shape[:2], coords, extents, values, level0_size=level0_size)
    best = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:top]
    rows = 2 if read_tile is not None and len(best) else 1
    aspect = thumb.shape[0] / thumb.shape[1]
    # the tiles beneath: rows of up to PER_ROW, each 12 / PER_ROW inches and its titles tall
    strip = math.ceil(len(best) / PER_ROW) * (12 / max(min(len(best), PER_ROW), 6) + 0.45)
    height = 5.6 * aspect + 0.6
    fig = plt.figure(figsize=(12, height + (strip if rows == 2 else 0)), layout="constrained")
    parts = fig.subfigures(rows, 1, height_ratios=[height, strip][:rows]) if rows == 2 else [fig]
    top_row = parts[0].add_gridspec(1, 3, width_ratios=[1, 1, 0.04])
    ax = parts[0].add_subplot(top_row[0])
    ax.imshow(thumb)
    ax.set_title("slide", fontsize=10)
    ax2 = parts[0].add_subplot(top_row[1], sharex=ax, sharey=ax)
    ax2.imshow(overlay(thumb, heat, cmap=cmap))
    _number_tiles(ax2, thumb.shape[:2], coords, extents, best, level0_size)
    ax2.set_title(f"{label} ({SCALES[scale]})" if SCALES[scale] else label, fontsize=10)
    for a in (ax, ax2):
        a.set_xticks([]), a.set_yticks([])
    import matplotlib

    mappable = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, 1), cmap=cmap)
    bar = fig.colorbar(mappable, cax=parts[0].add_subplot(top_row[2]))
    bar.set_label(f"{label} percentile" if scale == "rank" else label, fontsize=9)
    if rows == 2:
        _tile_row(parts[1], best, read_tile, scores, coords)
    if title:
        fig.suptitle(title, fontsize=12)
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def _number_tiles(ax, shape, coords, extents, best, level0_size) -> None:
    """Outline the highest-scored tiles on the overlay and number them 1..k inside."""
    from matplotlib import patheffects
    from matplotlib.patches import Rectangle

    h, w = shape
    sx, sy = w / level0_size[0], h / level0_size[1]
    halo = [patheffects.withStroke(linewidth=2, foreground="black")]
    # the overlay is about 5.3 inches wide (save_heatmap's layout): numbers about a third of a
    # tile's side on the page, legible from 6 pt, never larger than 13 pt
    points = 5.3 * 72 / max(w, h)
    for rank, i in enumerate(best, start=1):
        (x, y), e = coords[i], extents[i]
        size = float(np.clip(e * sx * points / 3, 6, 13))
        ax.add_patch(Rectangle((x * sx - 0.5, y * sy - 0.5), e * sx, e * sy, fill=False,
                               edgecolor="white", linewidth=1.0))  # fmt: skip
        ax.text(x * sx + e * sx / 2 - 0.5, y * sy + e * sy / 2 - 0.5, str(rank), color="white",
                fontsize=size, ha="center", va="center", fontweight="bold", path_effects=halo)  # fmt: skip


def _tile_row(fig, best, read_tile, scores, coords) -> None:
    """The highest-scored tiles in rows of PER_ROW (at least 6 columns, so that a few tiles
    are not drawn huge), titled with rank, score and position."""
    cols = max(min(len(best), PER_ROW), 6)
    grid = fig.add_gridspec(math.ceil(len(best) / PER_ROW), cols)
    for k, i in enumerate(best):
        ax = fig.add_subplot(grid[k // cols, k % cols])
        ax.imshow(read_tile(int(i)))
        ax.set_xticks([]), ax.set_yticks([])
        x, y = coords[i]
        ax.set_title(f"#{k + 1}  {float(scores[i]):.3g}\nx {int(x)}, y {int(y)}", fontsize=8)
