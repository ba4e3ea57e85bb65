"""Embed whole slides straight from their files: no image tile is ever written.

    python -m histodist.embed --slides slides/ --mpp 0.5 --tile-size 224 --model uni --out emb/x

The slides are found, opened, surveyed (µm/px, tissue mask, tile grid, QC picture; cached in
`OUT/.slides/`), labelled and split by the whole-slide tiler's own functions
(histodist.ingest.sources.wsi.scan and histodist.shard.make_splits), so the tiles and splits
are exactly those of `histodist.shard --dataset wsi` with the same options. Each slide becomes
one embedding shard, `OUT/<slide id>.tar` (histodist.data.embeddings: a float16 vector, the
label and the tile JSON per tile, in the tiler's (y, x) order), written under a temporary name
and renamed when complete, with its record in `OUT/.shardinfo/`; the record's fingerprint
names the weights, the preprocessing, the slide file (size, mtime, sha256), the tiling options
and the slide's label and patient, so a re-run skips every slide that is complete and
unchanged, and redoes only those an interrupted run left unfinished.

Ranks (histodist.ingest.slides.ranks: `accelerate launch`, torchrun, a Slurm array) share the
slides by tile count; every slide is embedded by exactly one rank. Under a launcher rank 0 waits
for the others and writes the manifest; in a Slurm array whichever task finds every slide
finished writes it (re-running the command also does). The manifest is the embedding-set
manifest `histodist.embed --shards` writes (per-slide index, `slides` / `rejected_slides` /
`tiling` as the tiler's manifest, throughput), so `histodist.train --model abmil` reads it
unchanged.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import torch

from histodist.data import embeddings
from histodist.errors import warn
from histodist.fileio import atomic_path, atomic_write, file_digest
from histodist.inference.backbone import Backbone
from histodist.inference.tile_stream import SlideFailed, TileBatch, TileStream
from histodist.ingest.slides.ranks import Rank, share
from histodist.ingest.sources import Item, Scan, SourceOptions
from histodist.ingest.sources.wsi import WsiOptions
from histodist.ingest.writer import INFO_DIR, finished_record
from histodist.models import features

WRITER_VERSION = 1  # bump when the bytes written for the same slide and backbone change


@dataclass(frozen=True)
class SlideUnit:
    """One slide to embed into its own shard `name`."""

    slide: str
    split: str
    item: Item  # the tiler's slide item: label, group, extra (slide, tiles, patient, split)
    name: str
    fingerprint: str
    tiles: int

    def segment(self) -> Item:
        """The item the tiler's reader expands into the slide's tiles."""
        extra = {**self.item.extra, "start": 0, "stop": self.tiles}
        return Item(self.item.key, self.item.source, self.item.label, self.item.group, extra)


@dataclass
class Options:
    """How the slides are embedded (histodist.embed's flags)."""

    batch_size: int = 64
    prefetch: int = 4  # batches read ahead
    read_threads: int = 2  # threads reading a slide's regions (the tiler's READ_THREADS)
    val_fraction: float | None = None
    test_fraction: float | None = None
    seed: int = 0  # the split of slides without a split column (histodist.shard's --seed)
    magnification: str | None = None  # as given, for the manifest's tiling block
    name: str | None = None  # the dataset name (default: the output folder's)
    command: str = ""
    progress: bool = True


@dataclass
class Stats:
    """One rank's work: tiles embedded and reused, seconds (its embedding wall time) split
    into model (transfer, preprocessing, forward), write and wait (for tiles: reading not
    hidden), and the reading thread's own busy time."""

    tiles: int = 0
    reused: int = 0
    slides: int = 0
    failed: int = 0
    seconds: float = 0.0
    model_s: float = 0.0
    write_s: float = 0.0
    wait_s: float = 0.0
    read_s: float = 0.0
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- the plan
def scan_slides(src: str, wsi: WsiOptions, opts: Options) -> tuple[Scan, dict[str, list[Item]]]:
    """The tiler's scan of `src` (slides opened, surveyed into `wsi.out`, labelled) and its
    splits, as histodist.shard --dataset wsi makes them."""
    from histodist.ingest import sources
    from histodist.shard import make_splits

    scan = sources.scan("wsi", src, SourceOptions(wsi=wsi))
    return scan, make_splits(scan, opts.val_fraction, opts.test_fraction, opts.seed)


def plan(scan: Scan, splits: dict[str, list[Item]], identity: dict, wsi: WsiOptions) -> list:
    """One SlideUnit per slide with tiles, split by split, in the splits' order."""
    surveys = {r["id"]: r for r in scan.extra["surveys"]}
    coverage = wsi.label_coverage if wsi.annotations else None
    units = []
    for split, items in splits.items():
        for it in items:
            sid = it.extra["slide"]
            rec = surveys[sid]
            content = {k: v for k, v in it.extra.items() if k != "split"}  # the split: no byte
            blob = json.dumps([WRITER_VERSION, identity, rec["key"], rec["sha256"], it.label,
                               it.group, content, coverage, scan.classes], sort_keys=True)  # fmt: skip
            fp = hashlib.sha256(blob.encode()).hexdigest()
            units.append(SlideUnit(sid, split, it, f"{sid}.tar", fp, int(it.extra["tiles"])))
    return units


def mine(units: list[SlideUnit], rank: Rank) -> list[SlideUnit]:
    """This rank's slides: shared by tile count (the tiler's ranks.share), in plan order."""
    owner = share([u.tiles for u in units], rank.world)
    return [u for u, r in zip(units, owner, strict=True) if r == rank.rank]


def finished(out: Path, unit: SlideUnit, *, check_digest: bool = True) -> dict | None:
    """The record of a slide finished for this plan (embedded, or failed while read), else
    None. `check_digest`: re-hash the shard (a rank's own resume); the manifest writer checks
    its size only (the record is written after the rename)."""
    if check_digest:
        rec = finished_record(out, unit.name, unit.fingerprint)
        if rec is not None:
            return rec
    try:
        rec = json.loads((out / INFO_DIR / f"{unit.name}.json").read_text())
    except (OSError, ValueError):
        return None
    if rec.get("fingerprint") != unit.fingerprint:
        return None
    if rec.get("failed"):
        return rec
    if check_digest:
        return None
    path = out / unit.name
    return rec if path.is_file() and path.stat().st_size == rec.get("bytes") else None


# ----------------------------------------------------------------------------- embedding
@dataclass
class Engine:
    """The backbone on its device and what a batch needs: `autocast()` a context manager
    factory (None: full precision)."""

    backbone: Backbone
    device: torch.device
    autocast: Callable | None = None

    def __post_init__(self):
        self.model = self.backbone.model.to(self.device)
        self.transform = self.backbone.transform()

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 (B, D) on the CPU."""
        x = self.transform(pixels.to(self.device, non_blocking=True))
        with self.autocast() if self.autocast else nullcontext():
            return features(self.model, x, self.backbone.identity["model"]).float().cpu()


def embed_share(units: list[SlideUnit], reader, engine: Engine, out: Path, num_classes: int,
                opts: Options) -> Stats:  # fmt: skip
    """Embed this rank's slides into `out` (finished ones skipped); one record per slide."""
    from tqdm import tqdm

    stats, todo = Stats(), []
    for u in units:
        rec = finished(out, u)
        if rec is None:
            todo.append(u)
        else:
            stats.reused += int(rec.get("num_samples", 0))
    by_key = {u.slide: u for u in todo}
    stream = TileStream(reader, [(u.slide, u.segment(), u.tiles) for u in todo],
                        batch_size=opts.batch_size, prefetch=opts.prefetch)  # fmt: skip
    t0 = time.perf_counter()
    with tqdm(total=sum(u.tiles for u in todo), unit="tile", desc="embed", dynamic_ncols=True,
              disable=not opts.progress) as bar:  # fmt: skip
        for key, events in groupby(_timed(stream, stats), key=lambda ev: ev.key):
            rec = embed_slide(by_key[key], events, engine, out, num_classes, stats)
            bar.update(by_key[key].tiles)
            stats.slides += not rec.get("failed")
            stats.failed += bool(rec.get("failed"))
    stats.seconds, stats.read_s = time.perf_counter() - t0, stream.read_s
    return stats


def _timed(events: Iterable, stats: Stats):
    """The events, the consumer's time waiting for each counted in stats.wait_s."""
    it = iter(events)
    while True:
        t0 = time.perf_counter()
        ev = next(it, None)
        stats.wait_s += time.perf_counter() - t0
        if ev is None:
            return
        yield ev


class _Failed(Exception):
    """A slide that failed while read (its partial shard is removed)."""


def embed_slide(unit: SlideUnit, events: Iterable, engine: Engine, out: Path, num_classes: int,
                stats: Stats) -> dict:  # fmt: skip
    """Embed one slide's batches into `out/unit.name` (temp name, renamed when complete) and
    write its record; a slide that fails while read gets a record with the reason."""
    rec = {"name": unit.name, "fingerprint": unit.fingerprint, "slide": unit.slide}
    try:
        with atomic_path(out / unit.name) as tmp:
            with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w",
                                                    format=tarfile.GNU_FORMAT) as tar:  # fmt: skip
                writer = embeddings.ShardWriter(tar, num_classes)
                for ev in events:
                    if isinstance(ev, SlideFailed):
                        raise _Failed(ev.reason)
                    _write_batch(writer, ev, engine, stats)
            if writer.count != unit.tiles:
                raise _Failed(f"embedded {writer.count} tiles, the plan has {unit.tiles}")
            t0 = time.perf_counter()
            rec.update(num_samples=writer.count, bytes=tmp.stat().st_size, sha256=file_digest(tmp))
            stats.write_s += time.perf_counter() - t0
    except _Failed as e:
        rec.update(num_samples=0, failed=str(e), dropped=[{"unit": unit.slide, "reason": str(e)}])
        warn(f"slide {unit.item.source} left out: {e}")
    else:
        stats.tiles += writer.count
        rec.update(slides=writer.runs,
                   units=[{"unit": unit.slide, "start": 0, "count": writer.count}])  # fmt: skip
    atomic_write(out / INFO_DIR / f"{unit.name}.json", json.dumps(rec))
    return rec


def _write_batch(writer: embeddings.ShardWriter, ev: TileBatch, engine: Engine,
                 stats: Stats) -> None:  # fmt: skip
    t0 = time.perf_counter()
    vecs = engine(ev.pixels).numpy()
    t1 = time.perf_counter()
    for item, vec in zip(ev.items, vecs, strict=True):
        meta = embeddings.tile_meta({"group": item.group, **item.extra})
        writer.add(item.key, vec, -1 if item.label is None else item.label, meta)
    stats.model_s += t1 - t0
    stats.write_s += time.perf_counter() - t1
