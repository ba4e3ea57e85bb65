"""`python -m histodist.bench coverage`: what one training epoch reads, per shard layout.

    python -m histodist.bench coverage                      # the grid, from the epoch plans
    python -m histodist.bench coverage --shards DIR --world 4 --workers 4 --batch-size 32

Grid mode: for shard layouts x world sizes x loader workers, the figures of the epoch plan
that every rank's workers follow (histodist.data.epoch_plan; tests/test_data_epoch.py checks that
real workers read exactly what the plan says): distinct fraction, the most reads of a sample,
samples read / the split (read amplification) and samples skipped ahead / the split (passed
over before a range's start: a seek in local files, streamed for http / pipe: shards).
`--shards` mode runs the real train_loader of every rank in turn, DataLoader workers
included, for one epoch, and counts the keys its batches hold.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

from histodist.data import epoch_plan, steps_per_epoch

# name -> samples per shard
LAYOUTS: dict[str, list[int]] = {
    "pcam 29x9039+13": [9039] * 29 + [13],  # PCam train by the ~256 MB rule, unbalanced
    "pcam 30x8738": [8739] * 4 + [8738] * 26,  # the same, balanced
    "sample 8x2500": [2500] * 8,  # shards/pcam-sample train
    "4000 9x450": [450] * 8 + [400],  # 4,000 images, --samples-per-shard 450
    "1-sample shard": [1, 999, 500, 1500],
    "very uneven": [3000, 7, 120, 40, 2],
}
WORLDS, WORKERS = (1, 4, 8, 32), (2, 4, 8)


def grid_row(name: str, sizes: list[int], world: int, workers: int, batch: int) -> dict:
    n = sum(sizes)
    steps = steps_per_epoch(n, world, batch)
    plan = epoch_plan.plan_epoch(sizes, world_size=world, batch_size=batch, steps=steps,
                                 workers=workers, seed=0, epoch=0)  # fmt: skip
    s = epoch_plan.plan_summary(plan, sizes)
    most = -(-s["read"] // n) if s["read"] > n else 1
    return {"layout": name, "shards": len(sizes), "world": world, "workers": workers,
            "distinct": s["distinct"] / n, "max_reads": most, "read": s["read"] / n,
            "skipped": s["skipped"] / n, "shards_per_rank": s["shards_per_rank"]}  # fmt: skip


def print_grid(batch: int) -> None:
    print(f"batch {batch} per rank; one epoch; figures from the epoch plans")
    print(f"{'layout':17} {'shards':>6} {'world':>5} {'workers':>7} {'distinct':>9} "
          f"{'max reads':>9} {'read':>5} {'skipped':>7} {'shards/rank':>11}")  # fmt: skip
    for name, sizes in LAYOUTS.items():
        for world in WORLDS:
            for workers in WORKERS:
                r = grid_row(name, sizes, world, workers, batch)
                lo, hi = r["shards_per_rank"]
                print(f"{name:17} {r['shards']:>6} {world:>5} {workers:>7} "
                      f"{r['distinct']:>9.2%} {r['max_reads']:>9} {r['read']:>5.2f} "
                      f"{r['skipped']:>7.2f} {f'{lo}-{hi}':>11}")  # fmt: skip


def real_epoch(shards: str, world: int, workers: int, batch: int, split: str) -> None:
    """One epoch of every rank's real train_loader (DataLoader worker processes included)."""
    from histodist.data import loader as data

    n = data.load_manifest(shards)["splits"][split]["num_samples"]
    reads, lengths, t0 = Counter(), [], time.perf_counter()
    for rank in range(world):
        loader = data.train_loader(shards, split, batch_size=batch, rank=rank, world_size=world,
                                   workers=workers)  # fmt: skip
        if rank == 0:
            print(loader.describe())
        keys = [k for b in loader for k in b["key"]]
        lengths.append(len(keys) // batch)
        reads.update(keys)
    print(f"{n:,} samples, {world} ranks x {workers} workers, batch {batch}: batches per rank "
          f"{sorted(set(lengths))}, {sum(reads.values()):,} read, {len(reads):,} distinct "
          f"({len(reads) / n:.2%}), max reads of a sample {max(reads.values())}, "
          f"{time.perf_counter() - t0:.0f} s")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m histodist.bench coverage", description=__doc__)
    p.add_argument("--shards", help="read this shard folder for real instead of the grid")
    p.add_argument("--split", default="train")
    p.add_argument("--world", type=int, default=4, help="ranks (--shards mode)")
    p.add_argument("--workers", type=int, default=4, help="loader workers (--shards mode)")
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    args = p.parse_args(argv)
    if args.shards:
        real_epoch(args.shards, args.world, args.workers, args.batch_size, args.split)
    else:
        print_grid(args.batch_size)
    return 0
