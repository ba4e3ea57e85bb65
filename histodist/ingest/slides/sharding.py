"""Slides -> shard tasks, this rank's share of them written in parts, the manifest's slide records.

Within a split, slides are packed in order into shards of at most `per_shard` tiles, whole
slides where they fit (a slide larger than a shard gets consecutive shards of its own, of
balanced sizes); inside a shard a slide's tiles are contiguous, in (y, x) order, cut into
parts of at most PART_TILES tiles: the unit of parallel work and of resume. A chain of shards
that share a slide goes to one rank (so a slide that fails while reading is left out of all
its shards), chains are shared between ranks by tile count (tiles are tissue area).
"""

from __future__ import annotations

import math
import multiprocessing
import sys
import time
from pathlib import Path

from tqdm import tqdm

from histodist.ingest.slides.ranks import Rank, share
from histodist.ingest.sources import Item, Reader
from histodist.ingest.writer import (
    INFO_DIR,
    ShardTask,
    assemble,
    failed_units,
    part_tasks,
    reusable,
    write_shard,
)

PART_TILES = 2048  # ~50 MB of JPEG tiles: a kill loses at most this much work per worker
POLL_S = 5.0  # rank 0 of a launch checks for the other ranks' shards this often


def pack(sizes: list[int], per_shard: int) -> list[list[tuple[int, int, int]]]:
    """Shards as lists of (slide index, start, stop) tile ranges, slides in order."""
    shards, cur, room = [], [], per_shard
    for i, n in enumerate(sizes):
        if n > per_shard:
            if cur:
                shards.append(cur)
            cur, room = [], per_shard
            k = math.ceil(n / per_shard)
            start = 0
            for j in range(k):
                size = n // k + (j < n % k)
                shards.append([(i, start, start + size)])
                start += size
            continue
        if n > room:
            shards.append(cur)
            cur, room = [], per_shard
        cur.append((i, 0, n))
        room -= n
    if cur:
        shards.append(cur)
    return shards


def slide_sizes(manifest: dict, split: str) -> list[int]:
    """Tiles per slide of a split, in the order its shards hold them (manifest `slides`)."""
    recs = [r for r in manifest["slides"].values() if r["split"] == split and r["shards"]]
    recs.sort(key=lambda r: (r["shards"][0]["name"], r["shards"][0]["start"]))
    return [r["tiles"] for r in recs]


def per_shard_for(sizes: list[int], target: int, floor: int) -> tuple[int, int]:
    """(tiles per shard, shards `pack` makes of `sizes` with it): the largest value >= floor
    that gives at least `target` shards, else `floor` (the most shards of >= floor tiles)."""
    lo, hi = floor, max(floor, sum(sizes))
    if len(pack(sizes, lo)) < target:
        return lo, len(pack(sizes, lo))
    while lo < hi:  # the largest value still giving `target` shards (binary search)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(pack(sizes, mid)) >= target else (lo, mid - 1)
    return lo, len(pack(sizes, lo))


def plan(
    splits: dict[str, list[Item]],
    out: Path,
    reader: Reader,
    classes: list[str],
    *,
    encoding: str,
    quality: int,
    per_shard: dict[str, int],
) -> list[ShardTask]:
    """One ShardTask per shard (items: slide segments of <= PART_TILES tiles), every split;
    `per_shard`: at most this many tiles per shard, per split."""
    stats_split = "train" if "train" in splits else next(iter(splits))
    tasks = []
    for split, slides in splits.items():
        packed = pack([s.extra["tiles"] for s in slides], per_shard[split])
        for k, ranges in enumerate(packed):
            items = [seg for i, a, b in ranges for seg in _segments(slides[i], a, b)]
            tasks.append(ShardTask(str(out), f"{split}-{k:06d}.tar", items, reader, classes,
                                   encoding, quality, stats=split == stats_split,
                                   unit_key="slide"))  # fmt: skip
    return tasks


def _segments(slide: Item, start: int, stop: int) -> list[Item]:
    out = []
    for a in range(start, stop, PART_TILES):
        b = min(a + PART_TILES, stop)
        extra = {**slide.extra, "start": a, "stop": b}
        out.append(Item(f"{slide.key}-{a}", slide.source, slide.label, slide.group, extra))
    return out


def chains(tasks: list[ShardTask]) -> list[list[int]]:
    """Task indices grouped into runs of consecutive shards that share a slide."""
    groups: list[list[int]] = []
    last = None
    for i, t in enumerate(tasks):
        first = (t.name.split("-")[0], t.items[0].extra["slide"])
        if groups and last == first:
            groups[-1].append(i)
        else:
            groups.append([i])
        last = (t.name.split("-")[0], t.items[-1].extra["slide"])
    return groups


def mine(tasks: list[ShardTask], rank: Rank) -> list[ShardTask]:
    """This rank's tasks: whole chains, shared by tile count."""
    groups = chains(tasks)
    weights = [sum(_tiles(tasks[i]) for i in g) for g in groups]
    owner = share(weights, rank.world)
    return [tasks[i] for g, r in zip(groups, owner, strict=True) if r == rank.rank for i in g]


def _tiles(task: ShardTask) -> int:
    return sum(it.extra["stop"] - it.extra["start"] for it in task.items)


def write_share(tasks: list[ShardTask], rank: Rank, workers: int) -> dict[str, dict]:
    """Write this rank's shards (finished ones reused, unfinished parts redone); name ->
    record of each of them."""
    records, todo = {}, []
    for t in mine(tasks, rank):
        rec = reusable(t)
        if rec is not None:
            records[t.name] = {**rec, "reused": True}
        else:
            todo.append(t)
    jobs = [(t.name, p) for t in todo for p in part_tasks(t)]
    parts: dict[tuple[str, str], dict] = {}
    pool = None
    if workers > 1 and len(jobs) > 1:  # started before tqdm's monitor thread exists
        pool = multiprocessing.Pool(min(workers, len(jobs)))
    try:
        done = pool.imap_unordered(_write_part, jobs) if pool else map(_write_part, jobs)
        with tqdm(total=sum(_tiles(p) for _, p in jobs), unit="tile", desc="tiles",
                  dynamic_ncols=True) as bar:  # fmt: skip
            for name, rec, n in done:
                parts[name, rec["name"]] = rec
                bar.update(n)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    reused = sum(rec["reused"] for rec in parts.values())
    if reused:
        print(f"histodist.shard: {reused} of {len(parts)} slide parts were finished by an "
              "earlier run: reused", file=sys.stderr)  # fmt: skip
    failed: dict[str, str] = {}
    for t in todo:
        failed.update(failed_units(t, [parts[t.name, p.name] for p in part_tasks(t)]))
    for t in todo:
        records[t.name] = assemble(t, [parts[t.name, p.name] for p in part_tasks(t)], failed)
    return records


def _write_part(job: tuple[str, ShardTask]) -> tuple[str, dict, int]:
    name, part = job
    return name, write_shard(part), _tiles(part)


def finished(task: ShardTask) -> dict | None:
    """The record of a shard another rank finished for this plan (no re-hash: the record is
    written after the shard's rename, and the size must match), else None."""
    import json

    out = Path(task.out_dir)
    try:
        rec = json.loads((out / INFO_DIR / f"{task.name}.json").read_text())
        size = (out / task.name).stat().st_size
    except (OSError, ValueError):
        return None
    if rec.get("fingerprint") != task.fingerprint() or rec.get("bytes") != size:
        return None
    return {**rec, "reused": True}


def gather(tasks: list[ShardTask], records: dict[str, dict], rank: Rank) -> dict | None:
    """Every shard's record when all are finished and this rank writes the manifest (rank 0
    of a launch waits for the others), else None."""
    said = False
    while True:
        missing = []
        for t in tasks:
            if t.name not in records:
                rec = finished(t)
                if rec is None:
                    missing.append(t.name)
                else:
                    records[t.name] = rec
        if not missing:
            return records if rank.main or not rank.together else None
        if not (rank.together and rank.main):
            return None
        if not said:
            print(f"histodist.shard: rank 0: waiting for {len(missing)} shards of the other "
                  "ranks", file=sys.stderr)  # fmt: skip
            said = True
        time.sleep(POLL_S)


def manifest_slides(scan, splits: dict[str, list[Item]], records: dict[str, dict]) -> dict:
    """The manifest's `slides` and `rejected_slides` (docs/wsi.md) from the surveys and the
    shard records (where each slide's tiles landed; slides left out while reading)."""
    where: dict[str, list[dict]] = {}
    dropped: dict[str, str] = {}
    for name in sorted(records):
        for u in records[name].get("units", []):
            where.setdefault(u["unit"], []).append({"name": name, "start": u["start"],
                                                    "count": u["count"]})  # fmt: skip
        for d in records[name].get("dropped", []):
            dropped[d["unit"]] = d["reason"]
    item_of = {it.extra["slide"]: (split, it) for split, items in splits.items() for it in items}
    slides, rejected = (
        {},
        [{"path": p, "reason": r} for p, r in scan.extra["rejected_slides"].items()],
    )
    for rec in scan.extra["surveys"]:
        sid = rec["id"]
        if rec.get("error"):
            continue
        if sid in dropped:
            rejected.append({"path": rec["path"], "reason": dropped[sid]})
            continue
        split, item = item_of.get(sid, (None, None))
        shards = where.get(sid, [])
        slides[sid] = {
            **{k: rec[k] for k in ("path", "sha256", "bytes", "width", "height", "levels", "mpp",
                                   "mpp_source", "vendor", "level", "read_size", "extent")},
            "split": split,
            "label": item.label if item else None,
            "patient": item.extra.get("patient") if item else None,
            "tiles": sum(s["count"] for s in shards),
            "tissue_area_mm2": rec["tissue_area_mm2"],
            "shards": shards,
        }  # fmt: skip
    return {"slides": slides, "rejected_slides": rejected}
