"""A folder of slides -> an embedding set: the whole run of `histodist.embed --slides`.

    folder = find_slides("slides/", wsi, opts)        # the tiler's scan, surveys and splits
    manifest = embed_slides(folder, Path("emb/x"), backbone, device="cuda",
                            rank=ranks.from_env(), opts=opts)

scan and split the slides (the tiler's functions), take this rank's share, embed it
(histodist.inference.slide_embed), record the rank's throughput, and write the manifest when
every slide is finished: rank 0 of a launch waits for the other ranks; in a Slurm array the
task that finds everything finished writes it. Returns the manifest, or None for a rank that
leaves the manifest to another. `predict --slides` and `explain --slide` embed through here
too, into a folder of their own.
"""

from __future__ import annotations

import glob
import json
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from histodist.data import bags, embeddings
from histodist.fileio import atomic_write
from histodist.inference.backbone import Backbone
from histodist.inference.slide_embed import (
    Engine,
    Options,
    SlideUnit,
    Stats,
    embed_share,
    finished,
    mine,
    plan,
    scan_slides,
)
from histodist.ingest import outdir
from histodist.ingest.slides import sharding
from histodist.ingest.slides.ranks import Rank
from histodist.ingest.sources import Item, Scan
from histodist.ingest.sources.wsi import WsiOptions
from histodist.version import version_string

RANKS_DIR = ".ranks"  # each rank's throughput of its last run, read by the manifest's writer
POLL_S = 5.0  # rank 0 of a launch checks this often whether the other ranks have finished


@dataclass
class SlideFolder:
    """Slides found, opened, surveyed (into `wsi.out`) and split: what a rank embeds from."""

    src: str
    wsi: WsiOptions
    scan: Scan
    splits: dict[str, list[Item]]


def find_slides(src: str, wsi: WsiOptions, opts: Options) -> SlideFolder:
    """Scan, survey and split the slides under `src` (a folder or one slide) as the tiler
    does; raises UsageError (exit 2) for a slide without µm/px before anything is written."""
    scan, splits = scan_slides(src, wsi, opts)
    scan.reader.threads = opts.read_threads  # the tiler's WsiReader
    return SlideFolder(src, wsi, scan, splits)


def embed_slides(folder: SlideFolder, out: Path, backbone: Backbone, *, device, autocast=None,
                 precision: str = "no", rank: Rank | None = None,
                 opts: Options | None = None) -> dict | None:  # fmt: skip
    """Embed the slides of `folder` into the embedding set `out` on `device` (`autocast`: a
    context manager factory, `precision` its name for the record); the manifest (written to
    out/manifest.json), or None when another rank writes it."""
    rank, opts = rank or Rank(), opts or Options()
    out.mkdir(parents=True, exist_ok=True)
    outdir.start(outdir.survey(out))  # an interrupted run must not look complete
    scan, splits = folder.scan, folder.splits
    units = plan(scan, splits, backbone.identity, folder.wsi)
    engine = Engine(backbone, torch.device(device), autocast)
    stats = embed_share(mine(units, rank), scan.reader, engine, out, len(scan.classes), opts)
    stats.extra = {"device": str(engine.device), "precision": precision}
    key = _plan_key(units, rank.world)
    _write_rank(out, rank, key, stats)
    print(f"rank {rank.rank}: embedded {stats.tiles} tiles of {stats.slides} slides in "
          f"{stats.seconds:.1f} s ({stats.tiles / max(stats.seconds, 1e-9):.1f} tiles/s), "
          f"{stats.reused} tiles reused, {stats.failed} slides failed")  # fmt: skip
    records = _wait(out, units, rank, key)
    if records is None:
        print(f"histodist.embed: rank {rank.rank} of {rank.world}: slides embedded; the last "
              "rank to finish writes the manifest (or re-run the command)")  # fmt: skip
        return None
    blocks = {"tiling": folder.wsi.record(opts.magnification, scan.extra["labelled_by"]),
              "throughput": throughput(out, rank.world, key)}  # fmt: skip
    manifest = build_manifest(scan, splits, units, records, backbone, folder.src, opts, blocks)
    _remove_stale(out, {u.name for u in units})  # the writer's files only, never the user's
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


# ----------------------------------------------------------------------------- ranks
def _plan_key(units: list[SlideUnit], world: int) -> str:
    import hashlib

    h = hashlib.sha256(f"{world}".encode())
    for u in units:
        h.update(u.fingerprint.encode())
    return h.hexdigest()


def _write_rank(out: Path, rank: Rank, key: str, stats: Stats) -> None:
    rec = {"rank": rank.rank, "world": rank.world, "plan": key, **asdict(stats)}
    atomic_write(out / RANKS_DIR / f"{rank.rank}-of-{rank.world}.json", json.dumps(rec))


def _ranks(out: Path, world: int, key: str) -> list[dict]:
    """The rank records of this plan that exist."""
    found = []
    for r in range(world):
        try:
            rec = json.loads((out / RANKS_DIR / f"{r}-of-{world}.json").read_text())
        except (OSError, ValueError):
            continue
        if rec.get("plan") == key:
            found.append(rec)
    return found


def _wait(out: Path, units: list[SlideUnit], rank: Rank, key: str) -> dict | None:
    """Every slide's record (name -> record) when all are finished and this rank writes the
    manifest (rank 0 of a launch waits for the others), else None."""
    said = False
    while True:
        records = {u.name: finished(out, u, check_digest=False) for u in units}
        done = all(records.values()) and len(_ranks(out, rank.world, key)) == rank.world
        if done:
            return records if rank.main or not rank.together else None
        if not (rank.together and rank.main):
            return None
        if not said:
            print(f"histodist.embed: rank 0: waiting for the other {rank.world - 1} ranks",
                  file=sys.stderr)  # fmt: skip
            said = True
        time.sleep(POLL_S)


def throughput(out: Path, world: int, key: str) -> dict:
    """The run's throughput over every rank: tiles embedded (not reused) per second of the
    slowest rank's embedding time, and where the time went (summed over the ranks)."""
    recs = _ranks(out, world, key)
    tiles, wall = sum(r["tiles"] for r in recs), max((r["seconds"] for r in recs), default=0.0)
    first = recs[0]["extra"] if recs else {}
    return {
        "tiles": tiles, "reused": sum(r["reused"] for r in recs), "seconds": round(wall, 3),
        "processes": world, "device": first.get("device"), "precision": first.get("precision"),
        "tiles_per_s": round(tiles / wall, 2) if tiles and wall > 0 else None,
        **{k: round(sum(r[k] for r in recs), 3) for k in ("model_s", "write_s", "wait_s", "read_s")},
    }  # fmt: skip


# ----------------------------------------------------------------------------- manifest
def build_manifest(scan: Scan, splits: dict[str, list[Item]], units: list[SlideUnit],
                   records: dict[str, dict], backbone: Backbone, src: str, opts: Options,
                   blocks: dict) -> dict:  # fmt: skip
    """The embedding set's manifest (the format histodist.embed --shards writes); `blocks`:
    its `tiling` and `throughput`."""
    by_split: dict[str, list[dict]] = {}
    for u in units:
        rec = records[u.name]
        if not rec.get("failed"):
            by_split.setdefault(u.split, []).append(rec)
    tiler = sharding.manifest_slides(scan, splits, records)  # the tiler's slides, rejected
    index = bags.slide_index(by_split, tiler["slides"], len(scan.classes))
    root = Path(src).resolve()
    return {
        "format": "histodist-shards/1",
        "kind": embeddings.KIND,
        "dataset": opts.name or scan_name(root),
        "layout": "wsi",
        "source": str(root if root.is_dir() else root.parent),
        "classes": scan.classes,
        "task": "binary" if len(scan.classes) == 2 else "multiclass",
        "group_by": scan.group_by,
        "encoding": "float16-npy",
        "image": None,
        "embedding": {
            **backbone.identity,
            "build": backbone.build_args,
            "dtype": "float16",
            "member": embeddings.MEMBER,
            "source_slides": str(root),
        },  # fmt: skip
        "splits": {s: _split(by_split.get(s, []), items, scan) for s, items in splits.items()},
        "slides": index,
        "rejected_slides": tiler["rejected_slides"],
        "tiling": blocks["tiling"],
        "throughput": blocks["throughput"],
        "seed": opts.seed,
        "command": opts.command,
        "histodist_version": version_string(),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def scan_name(root: Path) -> str:
    return root.name if root.is_dir() else root.stem


def _split(recs: list[dict], items: list[Item], scan: Scan) -> dict:
    counts = [0] * len(scan.classes)
    for rec in recs:
        for run in rec["slides"]:
            counts = [a + b for a, b in zip(counts, run["labels"], strict=True)]
    return {
        "num_samples": sum(r["num_samples"] for r in recs),
        "class_counts": counts if scan.classes else None,
        "num_groups": len({it.group for it in items if it.group is not None}),
        "shards": [{k: r[k] for k in ("name", "num_samples", "bytes", "sha256")} for r in recs],
    }


def _remove_stale(out: Path, names: set[str]) -> None:
    """Shards of slides no longer in the plan (those with the writer's record, and their
    records: histodist.ingest.outdir's rule, so a user's file is never deleted), and the
    temporary files an interrupted run left of this plan's shards."""
    outdir.remove_stale(outdir.survey(out), names)
    for name in names:
        for p in out.glob(f".{glob.escape(name)}.*.tmp"):  # atomic_path's temporary names
            p.unlink(missing_ok=True)
