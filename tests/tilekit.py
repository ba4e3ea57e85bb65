"""Tile shards of whole slides in the tiler's format (docs/shards.md, `--dataset wsi`), built
from real PCam patches: each slide is a grid of patches, positive slides hold a few class-1
patches among class-0 ones. Written through histodist's own shard writer.

    manifest = tile_shards(tmp / "tiles", pcam_jpeg, [TileSlide("s0", "train", 1, 12, 2), ...])
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from shardkit import pcam_images

from histodist.ingest.sources import FileReader, Item
from histodist.ingest.writer import ShardTask, write_shard

TILE_SIZE, MPP, LEVEL0_MPP = 96, 0.5, 0.25
EXTENT = round(TILE_SIZE * MPP / LEVEL0_MPP)  # a tile's side in level-0 pixels


@dataclass
class TileSlide:
    id: str
    split: str
    label: int | None
    tiles: int
    positives: int = 0  # tiles cut from class-1 patches
    patient: str | None = None


def _items(slide: TileSlide, neg: list, pos: list) -> list[Item]:
    """The slide's tiles on a grid in (y, x) order; the positives spread over the grid."""
    cols = math.ceil(math.sqrt(slide.tiles))
    step = max(1, slide.tiles // max(1, slide.positives))
    where = {i * step for i in range(slide.positives)}
    out = []
    for i in range(slide.tiles):
        path, _ = pos.pop() if i in where else neg.pop()
        x, y = (i % cols) * EXTENT, (i // cols) * EXTENT
        extra = {"slide": slide.id, "x": x, "y": y, "level": 0, "mpp": MPP,
                 "tissue": 0.9, "extent": EXTENT}  # fmt: skip
        rel = str(Path(path).relative_to(Path(path).parents[2]))
        out.append(Item(f"{slide.id}_x{x}_y{y}", rel, slide.label,
                        slide.patient or slide.id, extra))  # fmt: skip
    return out


def tile_shards(out: Path, pcam_jpeg: Path, slides: list[TileSlide], per_shard: int) -> dict:
    """Shards of `per_shard` tiles per split (a slide may span two), the manifest with the
    per-slide index; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    neg = pcam_images(pcam_jpeg, "train", 400)[:400]
    pos = [p for p in pcam_images(pcam_jpeg, "train", 400) if p[1] == 1]
    items = {s.id: _items(s, neg, pos) for s in slides}
    index, splits = {}, {}
    for split in dict.fromkeys(s.split for s in slides):
        rows = [(s, it) for s in slides if s.split == split for it in items[s.id]]
        shards = []
        for j, lo in enumerate(range(0, len(rows), per_shard)):
            chunk, name = rows[lo : lo + per_shard], f"{split}-{j:06d}.tar"
            task = ShardTask(str(out), name, [it for _, it in chunk], FileReader(pcam_jpeg),
                             ["0", "1"])  # fmt: skip
            rec = write_shard(task)
            shards.append({k: rec[k] for k in ("name", "num_samples", "bytes", "sha256")})
            for k, (s, _) in enumerate(chunk):
                parts = index.setdefault(s.id, [])
                if parts and parts[-1]["name"] == name:
                    parts[-1]["count"] += 1
                else:
                    parts.append({"name": name, "start": k, "count": 1})
        labels, groups = [it.label for _, it in rows], {it.group for _, it in rows}
        splits[split] = {"num_samples": len(rows), "num_groups": len(groups),
                         "class_counts": [labels.count(0), labels.count(1)], "shards": shards}  # fmt: skip
    manifest = {
        "format": "histodist-shards/1", "dataset": "synthetic-slides", "layout": "wsi",
        "classes": ["0", "1"], "task": "binary", "group_by": "patient", "encoding": "original",
        "image": {"height": TILE_SIZE, "width": TILE_SIZE, "mode": "RGB"},
        "mean": [0.7, 0.55, 0.7], "std": [0.2, 0.25, 0.2], "splits": splits,
        "slides": {s.id: _slide_entry(s, index[s.id]) for s in slides},
        "rejected_slides": [],
        "tiling": {"mpp": MPP, "magnification": None, "tile_size": TILE_SIZE,
                   "min_tissue": 0.5, "label_coverage": None, "reader": "openslide"},
    }  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _slide_entry(s: TileSlide, parts: list[dict]) -> dict:
    side = math.ceil(math.sqrt(s.tiles)) * EXTENT
    return {"path": f"{s.id}.tif", "sha256": "0" * 64, "bytes": 0, "width": side,
            "height": side, "levels": [[side, side, 1.0]], "mpp": LEVEL0_MPP,
            "mpp_source": "metadata", "split": s.split, "label": s.label,
            "patient": s.patient, "tiles": s.tiles, "tissue_area_mm2": 1.0, "shards": parts}  # fmt: skip
