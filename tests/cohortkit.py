"""A labelled cohort of whole slides built from real PCam patches, for slide-level (MIL) tests.

    labels = cohort(tmp / "slides", pcam_jpeg, {"train": 12, "valid": 4, "test": 8})

Each slide is a pyramidal TIFF (tests/slidekit.py: 0.25 µm/px, levels 1 and 4) whose tissue is
a block of 256 px cells, one real 96 px PCam patch each; a positive slide (label "tumor") holds
a few class-1 patches among class-0 ones, a negative slide only class-0 patches. No patch is
used twice where the source holds enough (pcam-jpeg's 23,000; the bundled 1,000-patch sample
holds fewer H&E-saturated normal patches than the cells, and there patches repeat within their
source split); slides of the test split take PCam's valid patches, the others PCam's train
patches, so held-out slides show tissue neither the head nor a tile encoder trained on PCam's
training patches has seen. `labels.csv` gives each
slide's label, patient and split (histodist.shard / embed --labels).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from slidekit import CELL, write_pyramid

from histodist.ingest.slides.tissue import saturation

COLS, ROWS = 6, 5  # the canvas, in cells
FAST = ["--mpp", "1.0", "--tile-size", "64"]  # one 64 px tile per cell, read at the 4x level


@dataclass(frozen=True)
class CohortSlide:
    name: str
    split: str
    label: int
    cells: dict[tuple[int, int], int]  # (col, row) -> PCam class of the cell's patch

    @property
    def tumour_cells(self) -> list[tuple[int, int]]:
        return sorted(c for c, v in self.cells.items() if v == 1)


def tissue_patches(pcam_jpeg: Path, split: str, label: int, n: int) -> list[np.ndarray]:
    """The first `n` real PCam patches of a class of `split` whose pixels are at least 80%
    saturated as H&E is (HSV saturation > 0.15, the top of the tissue detector's threshold
    range: a cell the tissue mask takes whole) and not nearly black (mean value >= 90 of 255:
    PCam holds a few underexposed patches). uint8 (96, 96, 3)."""
    out = []
    for p in sorted((pcam_jpeg / split / str(label)).glob("*.jpg")):
        if len(out) == n:
            break
        px = np.asarray(Image.open(p).convert("RGB"))
        if (saturation(px) > 0.15).mean() >= 0.8 and px.mean() >= 90:
            out.append(px)
    return out


def plan(counts: dict[str, int], *, seed: int = 0, positives: tuple[int, int] = (2, 3)) -> list:
    """CohortSlides: per split, half positive; tissue a w x h block (w, h in 3..5) somewhere on
    the canvas; a positive slide's tumour cells drawn among its block's."""
    rng = np.random.default_rng(seed)
    out = []
    for split, n in counts.items():
        for i in range(n):
            w, h = (int(v) for v in rng.integers(3, 6, size=2))
            x0, y0 = int(rng.integers(0, COLS - w + 1)), int(rng.integers(0, ROWS - h + 1))
            cells = {(x0 + c, y0 + r): 0 for c in range(w) for r in range(h)}
            label = i % 2
            if label:
                k = int(rng.integers(positives[0], positives[1] + 1))
                keys = list(cells)
                for j in rng.choice(len(keys), k, replace=False):
                    cells[keys[j]] = 1
            out.append(CohortSlide(f"{split}-{i:03d}", split, label, cells))
    return out


def cohort(folder: Path, pcam_jpeg: Path, counts: dict[str, int], *, seed: int = 0,
           positives: tuple[int, int] = (2, 3)) -> tuple[Path, list[CohortSlide]]:  # fmt: skip
    """Write the slides of `plan` into `folder` and `folder/../labels.csv`; returns (the CSV,
    the slides)."""
    slides = plan(counts, seed=seed, positives=positives)
    pools = {}
    for source in ("train", "valid"):
        mine = [s for s in slides if (s.split == "test") == (source == "valid")]
        for c in (0, 1):
            n = sum(1 for s in mine for v in s.cells.values() if v == c)
            pools[source, c] = tissue_patches(pcam_jpeg, source, c, n) if n else []
            if n and not pools[source, c]:
                pytest.skip(f"{pcam_jpeg}/{source}/{c}: no H&E-saturated patch to build slides")
    used = dict.fromkeys(pools, 0)
    for s in slides:
        img = np.full((ROWS * CELL, COLS * CELL, 3), 255, np.uint8)
        source = "valid" if s.split == "test" else "train"
        for (col, row), c in sorted(s.cells.items()):
            pool = pools[source, c]
            patch = pool[used[source, c] % len(pool)]  # repeats only when the source is short
            used[source, c] += 1
            cell = Image.fromarray(patch).resize((CELL, CELL), Image.BILINEAR)
            img[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL] = np.asarray(cell)
        write_pyramid(folder / f"{s.name}.tif", img)
    labels = folder.parent / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide", "label", "patient", "split"])
        for s in slides:
            w.writerow([s.name, ["normal", "tumor"][s.label], f"p-{s.name}", s.split])
    return labels, slides
