"""The per-slide QC picture: what was tiled, at a glance.

The slide's thumbnail with the tissue mask's outline (green), every kept tile's square (blue
outline; filled red when its label is the positive class, e.g. tumour by annotation), and a
caption: slide id, size, µm/px and where it came from, tile size and µm/px, tiles kept, tissue
area, and the legend. Written beside the shards as `qc/<slide id>.jpg` (JPEG: a tenth of the
PNG's size for a photographic picture; the outlines stay legible).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from histodist.fileio import atomic_path

QC_SIDE = (1024, 2048)  # the picture's longest side is brought into this range
OUTLINE = (0, 200, 60)
TILE = (30, 90, 255)
POSITIVE = (230, 30, 30)


def qc_picture(
    path: str | Path,
    thumb: np.ndarray,
    mask: np.ndarray,
    dimensions: tuple[int, int],
    tiles: Sequence[tuple[int, int, int]],
    caption: Sequence[str],
    positive: Sequence[bool] | None = None,
) -> Path:
    """Write the QC picture (PNG or JPEG, by `path`'s extension) of one slide. `thumb`: uint8 (h, w, 3) of the whole slide; `mask`:
    bool tissue mask of any size covering the slide; `tiles`: level-0 (x, y, extent);
    `caption`: lines under the picture; `positive`: per tile, draw it filled red."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(thumb)
    side = max(im.size)
    scale = min(max(side, QC_SIDE[0]), QC_SIDE[1]) / side
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                   Image.Resampling.LANCZOS)  # fmt: skip
    s = im.width / dimensions[0]  # picture px per level-0 px
    overlay = Image.new("RGBA", im.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for i, (x, y, e) in enumerate(tiles):
        box = [x * s, y * s, (x + e) * s - 1, (y + e) * s - 1]
        fill = (*POSITIVE, 110) if positive is not None and positive[i] else None
        width = 2 if e * s >= 24 else 1  # thin lines where tiles are only a few pixels wide
        draw.rectangle(box, outline=(*TILE, 220), fill=fill, width=width)
    pic = Image.alpha_composite(im.convert("RGBA"), overlay)
    pic.paste(Image.new("RGBA", pic.size, (*OUTLINE, 255)), mask=_outline(mask, pic.size))
    out = _with_caption(pic.convert("RGB"), caption)
    with atomic_path(path) as tmp:
        if Path(path).suffix.lower() == ".png":
            out.save(tmp, format="PNG")
        else:
            out.save(tmp, format="JPEG", quality=90)
    return Path(path)


def _outline(mask: np.ndarray, size: tuple[int, int]):
    """An 'L' image (255 on the mask's boundary, 2 px wide) of `size`."""
    from PIL import Image
    from scipy import ndimage

    up = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size)) > 127
    edge = up & ~ndimage.binary_erosion(up, border_value=0)
    edge = ndimage.binary_dilation(edge)
    return Image.fromarray(edge.astype(np.uint8) * 255)


def _with_caption(im, lines: Sequence[str]):
    from PIL import Image, ImageDraw, ImageFont

    size = max(12, im.width // 70)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    legend = "green: tissue outline   blue: kept tiles   red: positive tiles"
    lines = [*lines, legend]
    line_h = round(size * 1.35)
    out = Image.new("RGB", (im.width, im.height + line_h * len(lines) + size), "white")
    out.paste(im, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(lines):
        draw.text((size // 2, im.height + size // 2 + i * line_h), text, fill=(0, 0, 0), font=font)
    return out
