"""Slide bags: every tile embedding of one slide, read by the manifest's per-slide index.

An embedding set of whole-slide tiles (histodist.embed over the tiler's shards) lists in its
manifest, per slide, where its tiles are:

    "slides": {<slide id>: {"split", "label", "label_source", "patient", "tiles",
               "shards": [{"name", "start", "count", "offset", "bytes"}, ...],
               + the tiler's fields (path, size, levels, µm/px, ...)}}

`start` is the index of the slide's first tile in that shard and `count` its tiles there;
`offset` and `bytes` the byte range of its tar members, so a local (or cached) shard gives a
slide's tiles in one seek and one read, indexed in memory (tarstream.locate) and gathered
into one array: 3.5-9x faster than a sample-by-sample stream (docs/mil.md has the figures).
Streams that cannot seek pass over the first `start` samples. A slide's label is the
tiler's (`slides[...].label`), else the one its tiles' classes give (label_source "tiles").

For MIL training the loaders here give the training loop one bag per rank per micro-step:
an epoch's slides are shuffled by (seed, epoch), laid out over the ranks, and the last
micro-step is filled up with one-tile zero bags of loss weight 0 where the slides do not
divide by the world size; every rank runs the same number of micro-steps, every slide is
trained once per epoch (docs/mil.md says why this design). The loss weights of the real bags
make each optimizer step's gradient the mean over the bags it holds.
"""

from __future__ import annotations

import json
import math
import random
import zlib
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
from webdataset.tariterators import group_by_keys

from histodist.data import embeddings
from histodist.data import workers as worker_procs
from histodist.data.loader import _first_samples, load_manifest
from histodist.data.remote import ShardError, join_url, open_url
from histodist.data.tarstream import TarStreamError, iter_tar, locate

PAD = -1  # the plan's mark of a padding bag (a zero tile of loss weight 0)


@dataclass(frozen=True)
class Part:
    """A slide's tiles in one shard: samples start..start+count-1, at bytes offset..+bytes."""

    name: str
    start: int
    count: int
    offset: int | None = None
    bytes: int | None = None


@dataclass(frozen=True)
class Slide:
    """One slide of an embedding set: where its tiles are and its label (-1: unknown)."""

    id: str
    split: str
    label: int
    patient: str | None
    tiles: int
    parts: tuple[Part, ...]


@dataclass
class Bag:
    """A slide's tiles: features float16 (N, D) on the CPU, in shard order (the tiler's (y, x)
    order), and each tile's JSON fields (histodist.data.embeddings.TILE_FIELDS)."""

    slide: Slide
    features: torch.Tensor
    tiles: list[dict]

    def coords(self) -> np.ndarray:
        """int64 (N, 2): each tile's top-left (x, y) in level-0 pixels."""
        return np.array([[t.get("x", 0), t.get("y", 0)] for t in self.tiles], dtype=np.int64)

    def extents(self) -> np.ndarray:
        """int64 (N,): each tile's side in level-0 pixels (0 where the tile JSON has none)."""
        return np.array([t.get("extent", 0) for t in self.tiles], dtype=np.int64)


# ----------------------------------------------------------------------------- the index
def tile_label(counts: list[int]) -> int | None:
    """A slide's label from its tiles' class counts: for two classes 1 when any tile is of
    class 1 (a slide with any tumour tile is positive), else the most frequent class; None
    when no tile is labelled (histodist.inference.report.aggregate_groups' rule)."""
    if not any(counts):
        return None
    if len(counts) == 2:
        return int(counts[1] > 0)
    return int(np.argmax(counts))


def slide_index(records: dict[str, list[dict]], src: dict, num_classes: int) -> dict:
    """The manifest's `slides` from the shard records of each split (in shard order; each
    record's "slides": embeddings.ShardWriter.runs) and the tile manifest's `slides` (`src`,
    whose fields are kept; its slides without tiles are listed with split None). Raises
    ShardError for a slide in two splits."""
    out: dict[str, dict] = {}
    counts: dict[str, list[int]] = {}
    for split, recs in records.items():
        for rec in recs:
            for run in rec.get("slides") or []:
                sid = run["slide"]
                if sid not in out:
                    keep = {k: v for k, v in (src.get(sid) or {}).items() if k != "shards"}
                    out[sid] = {**keep, "split": split, "tiles": 0, "shards": []}
                    counts[sid] = [0] * num_classes
                elif out[sid]["split"] != split:
                    raise ShardError(
                        f"slide {sid} has tiles in splits {out[sid]['split']} and {split}; "
                        "a slide's tiles must all lie in one split (re-shard the slides)"
                    )
                part = {k: run[k] for k in ("start", "count", "offset", "bytes")}
                out[sid]["shards"].append({"name": rec["name"], **part})
                out[sid]["tiles"] += run["count"]
                counts[sid] = [a + b for a, b in zip(counts[sid], run["labels"], strict=True)]
    for sid, e in out.items():
        given = e.get("label")
        e["label"] = given if given is not None else tile_label(counts[sid])
        found = "tiles" if e["label"] is not None else None
        e["label_source"] = "manifest" if given is not None else found
        e.setdefault("patient", None)
    for sid, e in src.items():  # slides without tissue: listed as the tiler lists them
        if sid not in out and not e.get("tiles"):
            source = "manifest" if e.get("label") is not None else None
            out[sid] = {**e, "split": None, "tiles": 0, "shards": [], "label_source": source}
    return out


def slides(manifest: dict, split: str, where: str = "the embedding set") -> list[Slide]:
    """The slides of `split`, in the order their tiles lie in the shards. Raises
    EmbeddingError when the set has no per-slide index."""
    index = manifest.get("slides")
    if not index:
        raise embeddings.EmbeddingError(
            f"{where} has no per-slide index (manifest 'slides'): embed shards of whole-slide "
            "tiles (python -m histodist.shard --dataset wsi, then histodist.embed) to train "
            "a MIL head"
        )
    order = {e["name"]: i for i, e in enumerate(manifest["splits"][split]["shards"])}
    out = []
    for sid, e in index.items():
        if e.get("split") != split:
            continue
        parts = tuple(Part(p["name"], int(p["start"]), int(p["count"]), p.get("offset"),
                           p.get("bytes")) for p in e["shards"])  # fmt: skip
        label = -1 if e.get("label") is None else int(e["label"])
        out.append(Slide(sid, split, label, e.get("patient"), int(e["tiles"]), parts))
    return sorted(out, key=lambda s: (order.get(s.parts[0].name, 0), s.parts[0].start))


# ----------------------------------------------------------------------------- reading
def read_bag(shards: str, slide: Slide, *, cache_dir: str | None = None,
             tiles: bool = True) -> Bag:  # fmt: skip
    """Every tile of `slide` from the embedding shards at `shards` (folder or URL base).
    `tiles`: also parse each tile's JSON (coordinates, for heatmaps); training reads only
    the vectors (Bag.tiles then empty). Raises ShardError when the shards do not hold the
    slide's tiles where the manifest says."""
    feats, metas = [], []
    for part in slide.parts:
        url = join_url(shards, part.name)
        buf = _byte_range(url, part, cache_dir)
        if buf is None:  # a stream that cannot seek: sample by sample from its start
            x, m = _stream_part(url, part, cache_dir)
        else:
            x, m = _parse_part(buf, url, part, tiles)
        if any(t.get("slide") != slide.id for t in m):
            raise ShardError(
                f"{url}: the samples at {part.start}..{part.start + part.count - 1} are not "
                f"tiles of slide {slide.id} (the manifest describes other shards); re-run "
                "histodist.embed"
            )
        feats.append(x)
        metas += m if tiles else []
    return Bag(slide, torch.cat(feats), metas)


def _byte_range(url: str, part: Part, cache_dir) -> bytes | None:
    """The bytes of the part's members, read at once, or None where the stream cannot seek
    or the index has no byte range."""
    if part.offset is None or part.bytes is None:
        return None
    with closing(open_url(url, cache_dir=cache_dir)) as f:
        if not getattr(f, "seekable", lambda: False)():
            return None
        f.seek(part.offset)
        buf = f.read(part.bytes)
    if len(buf) != part.bytes:
        raise ShardError(f"{url}: ends before byte {part.offset + part.bytes} (truncated?)")
    return buf


def _parse_part(buf: bytes, url: str, part: Part, tiles: bool) -> tuple[torch.Tensor, list]:
    """(float16 (count, D), tile JSONs: all with `tiles`, else the first and last, which
    check the slide id) of a part's bytes."""
    try:
        found = locate(buf, ("." + embeddings.MEMBER, ".json"))
        vecs, jsons = found["." + embeddings.MEMBER], found[".json"]
    except TarStreamError as e:
        raise ShardError(f"{url}: {e} at bytes {part.offset}..; re-run histodist.embed") from e
    if len(vecs) != part.count or len(jsons) != part.count:
        raise ShardError(
            f"{url}: {len(vecs)} embeddings at bytes {part.offset}.., the manifest says "
            f"{part.count}; re-run histodist.embed"
        )
    pick = jsons if tiles else [jsons[0], jsons[-1]]
    return embeddings.decode_vectors(buf, vecs), [json.loads(buf[s : s + n]) for s, n in pick]


def _stream_part(url: str, part: Part, cache_dir) -> tuple[torch.Tensor, list]:
    """A part read sample by sample: its shard streamed from the start, the first `start`
    samples passed over."""
    vecs, metas = [], []
    with closing(open_url(url, cache_dir=cache_dir)) as stream:
        files = ({"fname": name, "data": data, "__url__": url}
                 for name, data in iter_tar(stream, skip=_first_samples(part.start)))  # fmt: skip
        for raw in islice(group_by_keys(files), part.count):
            s = embeddings.decode(raw)
            vecs.append(s["image"].view(-1))
            metas.append(s["meta"])
    if len(vecs) != part.count:
        raise ShardError(
            f"{url}: {len(vecs)} of the {part.count} tiles from sample {part.start} (a "
            "truncated shard, or a manifest of other shards); re-run histodist.embed"
        )
    return torch.stack(vecs), metas


def sample_tiles(n: int, max_tiles: int, *, seed: int, epoch: int, slide: str):
    """Sorted indices of `max_tiles` of a bag's `n` tiles drawn without replacement, seeded by
    (seed, epoch, slide) alone (so any rank, worker or resume draws the same), or None to
    keep them all (max_tiles 0 or n <= max_tiles)."""
    if not max_tiles or n <= max_tiles:
        return None
    rng = np.random.default_rng([seed, epoch, zlib.crc32(slide.encode())])
    return np.sort(rng.choice(n, max_tiles, replace=False))


# ----------------------------------------------------------------------------- the plan
def epoch_plan(
    num_slides: int, *, world_size: int, accum_steps: int, seed: int, epoch: int
) -> list[list[tuple[int, float]]]:
    """plan[rank] = [(slide index or PAD, loss weight)] per micro-step of a training epoch.

    The slides, shuffled by (seed, epoch), fill micro-step i of rank r at position
    i * world + r; the ceil(S / world) micro-steps of the last one are topped up with PAD.
    A real bag's weight is world x accum / (real bags of its accumulation window over all
    ranks), PAD's is 0: the loop divides each loss by accum and DDP averages over the ranks,
    so every optimizer step's gradient is the mean over its real bags.
    """
    order = list(range(num_slides))
    random.Random(f"bags/{seed}/{epoch}").shuffle(order)
    steps = max(1, math.ceil(num_slides / world_size))
    slots = order + [PAD] * (steps * world_size - num_slides)
    window = world_size * accum_steps
    weight = []
    for w0 in range(0, len(slots), window):
        chunk = slots[w0 : w0 + window]
        real = sum(s != PAD for s in chunk)
        weight += [window / real if s != PAD else 0.0 for s in chunk]
    return [[(slots[i * world_size + r], weight[i * world_size + r]) for i in range(steps)]
            for r in range(world_size)]  # fmt: skip


class BagDataset(torch.utils.data.Dataset):
    """(slide index or PAD, weight, epoch) -> a Batch of one bag:
    {"image": float16 (1, N, D), "label": int64 (1,), "weight": float32 (1,),
    "key": [slide id], "group": [patient id or None]}."""

    def __init__(self, shards: str, slides: list[Slide], *, dim: int, seed: int = 0,
                 max_tiles: int = 0, cache_dir: str | None = None):  # fmt: skip
        self.shards, self.slides, self.dim = shards, slides, dim
        self.seed, self.max_tiles, self.cache_dir = seed, max_tiles, cache_dir

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, item: tuple[int, float, int]) -> dict:
        index, weight, epoch = item
        if index == PAD:
            x, label, key, group = torch.zeros(1, self.dim, dtype=torch.float16), 0, "", None
        else:
            s = self.slides[index]
            x = read_bag(self.shards, s, cache_dir=self.cache_dir, tiles=False).features
            pick = sample_tiles(len(x), self.max_tiles, seed=self.seed, epoch=epoch, slide=s.id)
            x = x if pick is None else x[torch.from_numpy(pick)]
            label, key, group = s.label, s.id, s.patient
        return {"image": x.unsqueeze(0), "label": torch.tensor([label]),
                "weight": torch.tensor([weight], dtype=torch.float32), "key": [key],
                "group": [group]}  # fmt: skip


class BagLoader:
    """Bags of one rank, one per batch: a training epoch's plan (epoch_plan) or, for
    evaluation, slides r::world in index order, each once, every tile. The loop's loader
    interface: len(), set_epoch(), iteration, describe(), stats(), forever()."""

    def __init__(self, dataset: BagDataset, *, rank: int, world_size: int, train: bool,
                 accum_steps: int = 1, workers: int = 0):  # fmt: skip
        self.ds, self.rank, self.world, self.train = dataset, rank, world_size, train
        self.accum, self.workers, self.epoch = accum_steps, workers, 0

    def __len__(self) -> int:
        n = len(self.ds)
        return (
            max(1, math.ceil(n / self.world))
            if self.train
            else len(range(self.rank, n, self.world))
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def items(self) -> list[tuple[int, float, int]]:
        """This rank's (slide index or PAD, weight, epoch) of the current epoch, in order."""
        if not self.train:
            return [(i, 1.0, self.epoch) for i in range(self.rank, len(self.ds), self.world)]
        plan = epoch_plan(len(self.ds), world_size=self.world, accum_steps=self.accum,
                          seed=self.ds.seed, epoch=self.epoch)  # fmt: skip
        return [(i, w, self.epoch) for i, w in plan[self.rank]]

    def __iter__(self) -> Iterator[dict]:
        multi = self.workers > 0
        loader = torch.utils.data.DataLoader(
            self.ds, sampler=self.items(), batch_size=None, num_workers=self.workers,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=worker_procs.init if multi else None,
        )  # fmt: skip
        batches = iter(loader)
        worker_procs.track(batches)
        try:
            yield from batches
        finally:  # an epoch that ends early ends its workers now (histodist.data.workers)
            worker_procs.stop(batches)

    def forever(self, epoch: int = 0) -> Iterator[dict]:
        """Batches of epochs `epoch`, `epoch` + 1, ... without end (lr_find)."""
        while True:
            self.set_epoch(epoch)
            yield from self
            epoch += 1

    def stats(self) -> dict:
        return {"decode_errors": 0, "bad_shards": 0}

    def describe(self) -> str:
        tiles = [s.tiles for s in self.ds.slides]
        n, steps = len(tiles), len(self)
        line = (f"{n} slides ({sum(tiles):,} tiles, {min(tiles, default=0)}-"
                f"{max(tiles, default=0)} per slide)")  # fmt: skip
        if not self.train:
            return f"{line} -> {self.world} ranks, each slide once"
        pad = steps * self.world - n
        line += f" -> {self.world} ranks x {steps} bags per epoch, {pad} padding bag(s)"
        return line + (f", --max-tiles {self.ds.max_tiles}" if self.ds.max_tiles else "")


def bag_loader(shards: str, split: str, *, train: bool, rank: int, world_size: int,
               seed: int = 0, max_tiles: int = 0, accum_steps: int = 1, workers: int = 0,
               cache_dir: str | None = None, manifest: dict | None = None) -> BagLoader:  # fmt: skip
    """The rank's loader over the bags of `split` of the embedding set at `shards`:
    training (`train`, the epoch plan, `max_tiles` sampled per bag) or evaluation (every
    slide once over the ranks, every tile)."""
    manifest = manifest or load_manifest(shards)
    if split not in manifest["splits"]:
        have = ", ".join(manifest["splits"])
        raise ShardError(f"{shards}: no split {split!r} in manifest.json (splits: {have})")
    found = slides(manifest, split, shards)
    if not found:
        raise ShardError(f"{shards}: no slides in split {split!r}")
    ds = BagDataset(shards, found, dim=int(manifest["embedding"]["dim"]), seed=seed,
                    max_tiles=max_tiles if train else 0, cache_dir=cache_dir)  # fmt: skip
    return BagLoader(ds, rank=rank, world_size=world_size, train=train,
                     accum_steps=accum_steps, workers=workers)  # fmt: skip
