"""Whole-slide images: the write side of `python -m histodist.shard --dataset wsi`.

reader.py       open_slide(): a small slide interface (size per level, µm/px, read a region,
                thumbnail) in front of a backend (openslide, imported lazily)
tissue.py       tissue_mask(): tissue on a thumbnail (Otsu on saturation + morphology)
tiling.py       plan_tiles(): the tile grid at exact µm/px, level choice, tissue fractions;
                read_tiles(): a slide's tiles as arrays, regions read ahead in threads
annotations.py  region annotations (GeoJSON, ASAP XML) -> per-tile annotated fractions
qc.py           the per-slide QC picture (thumbnail, tissue outline, kept tiles)
survey.py       one slide's metadata, checksum, tissue mask, tile plan and QC picture, cached
sharding.py     slides packed into shards, this rank's shards written in per-slide parts, the
                manifest's slide records
ranks.py        which rank of a cluster run this is (torchrun, accelerate, Slurm); sharing work
claim.py        which rank writes the manifest: once, under a lock in the output folder

The layout itself (labels, splits, the writer's reader) is histodist.ingest.sources.wsi.
"""
