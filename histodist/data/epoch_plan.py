"""Which samples every rank and loader worker reads in one training epoch, from shard sizes.

Every rank computes the same plan, with no communication, from (shard sizes, seed, epoch,
world size, batch size, steps, workers):

1. the shards are laid end to end in an order shuffled by (seed, epoch): one global range of
   N samples;
2. rank r takes the r-th of `world` consecutive ranges of steps x batch samples. What is left
   at the end, N - world x steps x batch < world x batch samples, is the drop-last remainder
   (a different one every epoch, as the order changes). Only when N < world x batch does the
   range wrap around to its start, so that every rank still fills its one batch;
3. a rank's range is cut between its loader workers by whole batches: worker k gets q_k
   batches (sum q_k = steps), so a worker batches exactly the samples it reads and no sample
   is dropped at a worker's end.

A worker's share is a list of Pieces (shard, start, stop): it passes over the members before
`start` without decoding them and stops reading at `stop`. Shards are cut where ranks and
workers need it, so fewer shards than ranks x workers, a 1-sample shard or very uneven sizes
cost no repeats. Imports nothing heavy: the plan is plain arithmetic, tested without data.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from itertools import accumulate


@dataclass(frozen=True)
class Piece:
    """Samples start..stop-1 (in the shard's own order) of shard number `shard` of the split."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


Plan = list[list[list[Piece]]]  # plan[rank][worker] -> the worker's pieces, in reading order


def worker_quotas(steps: int, workers: int) -> list[int]:
    """Batches of each of a rank's loader workers (workers=0: the one in-process reader).

    The first steps % workers workers take one more; DataLoader takes batches from its
    workers in turn and goes on with the others when one is done, so any quotas summing to
    `steps` give the rank exactly `steps` batches.
    """
    w = max(1, workers)
    return [steps // w + (k < steps % w) for k in range(w)]


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The shards' order in the epoch's global range: the same on every rank."""
    order = list(range(num_shards))
    random.Random(f"shard-order/{seed}/{epoch}").shuffle(order)
    return order


def cut(sizes: list[int], order: list[int], begin: int, end: int, starts=None) -> list[Piece]:
    """Pieces covering positions begin..end-1 of the shards laid end to end in `order`
    (positions past the total wrap around to the start). starts: [0, *accumulate(sizes in
    order)], when the caller has it."""
    starts = starts or [0, *accumulate(sizes[i] for i in order)]
    total, pieces, pos = starts[-1], [], begin
    while pos < end:
        offset = pos % total
        k = bisect.bisect_right(starts, offset) - 1
        shard, start = order[k], offset - starts[k]
        take = min(sizes[shard] - start, end - pos)
        pieces.append(Piece(shard, start, start + take))
        pos += take
    return pieces


def plan_epoch(
    sizes: list[int],
    *,
    world_size: int,
    batch_size: int,
    steps: int,
    workers: int,
    seed: int,
    epoch: int,
) -> Plan:
    """plan[rank][worker]: the pieces each worker of each rank reads this epoch (see above).

    sizes: samples per shard, in manifest order (empty shards are never read).
    """
    order = [i for i in shard_order(len(sizes), seed, epoch) if sizes[i] > 0]
    if not order:
        raise ValueError("no samples in the shards")
    quotas, starts = worker_quotas(steps, workers), [0, *accumulate(sizes[i] for i in order)]
    plan, begin = [], 0
    for _ in range(world_size):
        rank = []
        for q in quotas:
            rank.append(cut(sizes, order, begin, begin + q * batch_size, starts))
            begin += q * batch_size
        plan.append(rank)
    return plan


def plan_summary(plan: Plan, sizes: list[int]) -> dict:
    """Figures of a plan: samples read, distinct, left out, read twice; shards per rank, shards
    cut between readers; `skipped`: samples passed over before a piece's start (seeked over in
    local files, streamed through for http / pipe: sources)."""
    n = sum(sizes)
    pieces = [p for rank in plan for worker in rank for p in worker]
    read = sum(len(p) for p in pieces)
    distinct = min(n, read)  # the ranges are consecutive over a cyclic layout of n samples
    per_rank = [len({p.shard for w in rank for p in w}) for rank in plan]
    return {
        "samples": n,
        "read": read,
        "distinct": distinct,
        "left_out": n - distinct,
        "repeated": read - distinct,
        "shards_per_rank": (min(per_rank), max(per_rank)),
        "cut_pieces": sum(1 for p in pieces if len(p) < sizes[p.shard]),
        "skipped": sum(p.start for p in pieces),
        "workers_used": max(sum(1 for w in rank if w) for rank in plan),
    }


def describe(plan: Plan, sizes: list[int], *, batch_size: int, steps: int, workers: int) -> str:
    """One line: how an epoch's samples are split over ranks and workers."""
    s = plan_summary(plan, sizes)
    lo, hi = s["shards_per_rank"]
    used, k = s["workers_used"], max(1, workers)
    readers = f"{k} workers" if used == k else f"{used} of {k} workers (fewer batches)"
    return (
        f"{s['samples']:,} samples in {len(sizes)} shards -> {len(plan)} ranks x {readers}: "
        f"{lo if lo == hi else f'{lo}-{hi}'} shards per rank ({s['cut_pieces']} cut by sample "
        f"range), {steps} batches of {batch_size} per rank = {s['read']:,} samples per epoch "
        f"({s['left_out']:,} left out, {s['repeated']:,} twice); reads {s['read'] / s['samples']:.2f}x "
        f"the split, skips {s['skipped'] / s['samples']:.2f}x (a seek in local files)"
    )
