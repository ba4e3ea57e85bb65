"""Deterministic, class-stratified train / valid / test split made at the group level.

A group is a patient, lesion or slide id (or the sample itself when the layout has none):
all samples of a group land in one split, so no patient is ever in two splits. Groups are
shuffled with `seed`, then each is given to the held-out split (valid or test) whose unmet
per-class quota it fills best, provided it fills at least half its size from that quota;
otherwise it goes to train. With singleton groups this is an exact stratified split.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

from histodist.ingest.sources import Item


def quota(n: int, fraction: float) -> int:
    """Samples of a class that a held-out split should get: rounded, >= 1 when the class
    has at least 3 samples (so tiny fixtures still get every class in every split)."""
    if fraction <= 0:
        return 0
    q = round(n * fraction)
    return max(q, 1) if n >= 3 else q


def split_items(
    items: Sequence[Item],
    num_classes: int,
    fractions: dict[str, float],
    seed: int,
) -> dict[str, list[Item]]:
    """Split labelled `items` into "train" plus the held-out splits in `fractions`
    (e.g. {"valid": 0.1, "test": 0.1}). Returns split -> items (input order kept within a split)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        groups[_group(it)].append(i)
    totals = [0] * num_classes
    for it in items:
        totals[it.label] += 1
    need = {s: [quota(n, f) for n in totals] for s, f in fractions.items() if f > 0}

    order = sorted(groups)
    random.Random(seed).shuffle(order)
    assign: dict[str, str] = {}
    for g in order:
        counts = [0] * num_classes
        for i in groups[g]:
            counts[items[i].label] += 1
        best, gain = "train", 0
        for s, left in need.items():
            fill = sum(min(c, q) for c, q in zip(counts, left, strict=True))
            if fill > gain and 2 * fill >= len(groups[g]):
                best, gain = s, fill
        if best != "train":
            need[best] = [max(q - c, 0) for q, c in zip(need[best], counts, strict=True)]
        assign[g] = best

    out: dict[str, list[Item]] = {"train": [], **{s: [] for s in need}}
    for it in items:
        out[assign[_group(it)]].append(it)
    return {s: v for s, v in out.items() if v}


def _group(it: Item) -> str:
    """The group id, or the sample key (NUL-prefixed, so it never equals a real id)."""
    return it.group if it.group is not None else f"\0{it.key}"
