"""Shards -> uint8 batches for ONE rank (rank and world size are passed in; no augmentation).

The pipeline is a list of small webdataset-style stages run inside each DataLoader worker:

    shard URLs -> split by rank -> split by worker -> (resample | seeded passes) -> open + untar
    -> group members by key -> shuffle buffer (train) -> decode to uint8 (3,H,W) -> batch

Workers only read and decode; the main process receives collated uint8 batches (pinned when
CUDA is present) and the training loop moves them with `to_device(..., non_blocking=True)`.
Never hand a ShardLoader to `accelerator.prepare`: the rank split already happens here.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import multiprocessing
import random
import re
import warnings
from collections.abc import Iterable, Iterator
from itertools import islice

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys

from histodist import embeddings
from histodist.remote import ShardError, join_url, open_url, read_text
from histodist.tarstream import iter_tar

Batch = dict  # "image": uint8 (B,3,H,W) channels_last, "label": int64 (B,), "key", "group": lists

IMAGE_EXTS = ("jpg", "jpeg", "png", "tif", "tiff", "bmp", "webp", "ppm", "npy")
_TV_EXTS = {"jpg", "jpeg", "png", "webp"}  # torchvision decodes these; PIL does the rest
log = logging.getLogger(__name__)
_STATS = "__histodist_stats__"  # marker item a worker yields at the end of its epoch


class DataError(ValueError):
    """Inconsistent data in shards (e.g. images of different sizes without image_size)."""


def load_manifest(shards: str) -> dict:
    """Read `manifest.json` from a shard folder or URL base (file://, http(s)://, pipe:)."""
    url = join_url(shards, "manifest.json")
    try:
        manifest = json.loads(read_text(url))
    except json.JSONDecodeError as exn:
        raise ShardError(f"{url}: not valid JSON ({exn}); re-run histodist.shard") from exn
    if not str(manifest.get("format", "")).startswith("histodist-shards/"):
        raise ShardError(f"{url}: not a histodist shard manifest (format={manifest.get('format')})")
    return manifest


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    """Batches every rank yields per training epoch: full global batches only, at least one."""
    return max(1, num_samples // (world_size * batch_size))


def split_shards(manifest: dict, split: str, shards: str) -> list[tuple[str, int]]:
    """(url, num_samples) of each shard of `split`, in manifest order."""
    if split not in manifest.get("splits", {}):
        have = ", ".join(manifest.get("splits", {}))
        raise ShardError(f"{shards}: no split {split!r} in manifest.json (splits: {have})")
    entries = manifest["splits"][split]["shards"]
    return [(join_url(shards, e["name"]), int(e["num_samples"])) for e in entries]


# ----------------------------------------------------------------------------- stages
def split_by_rank(items: list, rank: int, world_size: int) -> list:
    """Shards r::world for rank r (the rank is passed in, not read from torch.distributed)."""
    return items[rank::world_size]


def worker_context() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker, (0, 1) in-process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def resampled(items: list, rng: random.Random) -> Iterator:
    """Infinite stream of items drawn with replacement (training with resample=True)."""
    while True:
        yield items[rng.randrange(len(items))]


def passes(items: list, rng: random.Random) -> Iterator[list]:
    """Endless shuffled orders of items, one per pass (training with resample=False)."""
    while True:
        order = list(items)
        rng.shuffle(order)
        yield order


def shard_samples(shard: tuple[str, int], counts: dict, *, skip_bad: bool, cache_dir: str | None):
    """Open one shard and yield its raw samples (dict of member bytes keyed by extension).

    A shard that cannot be opened, is truncated, or holds fewer samples than the manifest says
    raises ShardError naming it; with `skip_bad` it is counted in counts["bad_shards"] instead
    (samples read before the damage are kept).
    """
    url, expected = shard
    n = 0
    try:
        stream = open_url(url, cache_dir=cache_dir)
        try:
            files = (
                {"fname": name, "data": data, "__url__": url} for name, data in iter_tar(stream)
            )
            for sample in group_by_keys(files):
                n += 1
                yield sample
        finally:
            stream.close()
        if expected and n < expected:
            raise ShardError(f"{url}: {n} samples, manifest says {expected} (truncated?)")
    except Exception as exn:
        if not skip_bad:
            if isinstance(exn, ShardError):
                raise
            raise ShardError(
                f"bad shard {url}: {type(exn).__name__}: {exn}; re-create it or pass "
                "--skip-bad-shards"
            ) from exn
        counts["bad_shards"] += 1
        warnings.warn(f"skipping bad shard {url}: {exn}", stacklevel=1)


_NPY_HEADER = re.compile(
    rb"\{'descr': '\|u1', 'fortran_order': False, 'shape': \((\d+), (\d+)(?:, (\d+))?\), \}"
)


def _decode_npy(data: bytes) -> torch.Tensor:
    """uint8 .npy (H,W[,C]) -> (3,H,W). np.save's own header is parsed directly (np.load spends
    ~0.3 ms per 96x96 image in its header parser); anything else goes to np.load, always with
    allow_pickle=False."""
    m = _NPY_HEADER.match(data, 10) if data[:8] == b"\x93NUMPY\x01\x00" else None
    if m is not None:
        h, w, c = (int(v) if v else 1 for v in m.groups())
        start = 10 + int.from_bytes(data[8:10], "little")
        if len(data) - start != h * w * c:
            raise DataError(f".npy payload of {len(data) - start} bytes for shape {(h, w, c)}")
        t = torch.frombuffer(bytearray(data[start:]), dtype=torch.uint8).view(h, w, c)
    else:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            raise DataError(f".npy image of dtype {arr.dtype}, shape {arr.shape}: want uint8 HxWx3")
        t = torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], -1).copy())
    if t.shape[-1] not in (1, 3, 4):
        raise DataError(f".npy image of shape {tuple(t.shape)}: want HxW, HxWx1, HxWx3 or HxWx4")
    return t[..., :3].permute(2, 0, 1).expand(3, -1, -1)


@functools.cache
def _torchvision_decoder():
    """torchvision.io.decode_image as RGB, ~1.5-2x faster than PIL + numpy on PCam JPEGs
    (`python -m histodist.bench loader`); None where a torchvision build lacks it, then PIL
    decodes. torchvision 0.29 warns on every call that its image I/O is deprecated in favour
    of torchcodec: silenced once per process, the decoders work."""
    try:
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:
        return None
    warnings.filterwarnings("ignore", message=".*TorchVision are deprecated.*")
    return functools.partial(decode_image, mode=ImageReadMode.RGB)


def _decode_image(ext: str, data: bytes) -> torch.Tensor:
    """Encoded bytes -> uint8 (3,H,W), possibly a strided view (collate copies it once).
    Nothing is ever unpickled."""
    if ext == "npy":
        return _decode_npy(data)
    decode = _torchvision_decoder() if ext in _TV_EXTS else None
    if decode is not None:
        # bytearray: torch.frombuffer wants a writable buffer
        return decode(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.array(im.convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1)


def _resize_uint8(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    x = img.unsqueeze(0).float()
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0]


def decode_sample(raw: dict, image_size: tuple[int, int] | None) -> dict:
    """Raw member bytes -> {"image": uint8 (3,H,W), "label": int, "key": str, "group": str|None}.

    Only image members, `.cls` and `.json` are read; anything else (`.pyd`, `.pth`, `.pickle`,
    ...) is ignored, so nothing found in a tar is ever unpickled.
    """
    if embeddings.MEMBER in raw:  # an embedding set (histodist.embed): a float16 vector
        return embeddings.decode(raw)
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise DataError(f"{raw['__key__']}: no image member (have {sorted(raw)})")
    img = _decode_image(ext, raw[ext])
    if image_size is not None and tuple(img.shape[1:]) != tuple(image_size):
        img = _resize_uint8(img, image_size)
    label = int(raw["cls"].decode("ascii").strip()) if "cls" in raw else -1
    meta = json.loads(raw["json"].decode("utf-8")) if "json" in raw else {}
    return {"image": img, "label": label, "key": raw["__key__"], "group": meta.get("group")}


def decoded(samples: Iterable[dict], counts: dict, image_size) -> Iterator[dict]:
    """Decode stage: a sample that fails to decode is skipped and counted."""
    for raw in samples:
        try:
            yield decode_sample(raw, image_size)
        except Exception as exn:
            counts["decode_errors"] += 1
            if counts["decode_errors"] <= 3:  # a few messages, the total goes to stats()
                warnings.warn(
                    f"skipping {raw.get('__url__')}:{raw.get('__key__')}: {exn}", stacklevel=1
                )


def collate(samples: list[dict]) -> Batch:
    """List of decoded samples -> Batch with uint8 (B,3,H,W) images and int64 (B,) labels.

    The image batch is channels_last in memory (NHWC strides, shape still (B,3,H,W)): the
    decoders produce HWC pixels, so stacking them as is costs one plain copy, where an NCHW
    copy per image took ~4x longer on the CPU (the models run channels_last anyway). Call
    `.contiguous()` for NCHW memory."""
    shapes = {tuple(s["image"].shape) for s in samples}
    if len(shapes) > 1:
        raise DataError(
            f"images of different sizes {sorted(shapes)} in one batch (e.g. key "
            f"{samples[0]['key']}); set image_size (data.image_size) to resize them in the workers"
        )
    return {
        "image": torch.stack([s["image"].permute(1, 2, 0) for s in samples]).permute(0, 3, 1, 2),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "key": [s["key"] for s in samples],
        "group": [s["group"] for s in samples],
    }


def with_counts(batches: Iterable[Batch], counts: dict) -> Iterator[Batch]:
    """Attach the errors counted since the previous batch; a final marker carries the rest."""
    sent = {"decode_errors": 0, "bad_shards": 0}
    for batch in batches:
        batch[_STATS] = {k: counts[k] - sent[k] for k in sent}
        sent = dict(counts)
        yield batch
    yield {_STATS: {k: counts[k] - sent[k] for k in sent}}


def stream_samples(source: Iterator, counts: dict, *, skip_bad: bool, cache_dir, patience: int):
    """Raw samples of every shard `source` yields; stops an endless stream of bad shards."""
    empty = 0
    for shard in source:
        n = 0
        for sample in shard_samples(shard, counts, skip_bad=skip_bad, cache_dir=cache_dir):
            n += 1
            yield sample
        empty = 0 if n else empty + 1
        if empty > patience:  # resampling would otherwise spin forever on unreadable shards
            raise ShardError(f"{empty} shards in a row gave no samples (last: {shard[0]})")


# ----------------------------------------------------------------------------- dataset
class RankStream(IterableDataset):
    """The per-rank pipeline; each DataLoader worker runs `__iter__` on its own copy.

    Training (`steps` set): shards r::world for rank r (all shards when there are fewer shards
    than ranks), drawn per worker with a seed of (seed, epoch, rank, worker), with replacement
    (`resample`) or as shuffled passes over the worker's share; a shuffle buffer filled to its
    full size before the first sample; exactly `steps` batches over all workers of the rank.
    Evaluation (`steps` None): shards r::world, then w::workers, in order, each read once; the
    last partial batch is kept.
    """

    def __init__(
        self,
        shards: list[tuple[str, int]],
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        steps: int | None,
        seed: int = 0,
        shuffle_buffer: int = 0,
        resample: bool = False,
        image_size: tuple[int, int] | None = None,
        skip_bad_shards: bool = False,
        cache_dir: str | None = None,
    ):
        super().__init__()
        if not shards:
            raise ShardError("no shards to read")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.batch_size, self.steps, self.seed = batch_size, steps, seed
        self.shuffle_buffer, self.resample, self.image_size = shuffle_buffer, resample, image_size
        self.skip_bad_shards, self.cache_dir = skip_bad_shards, cache_dir
        # Shared memory, so set_epoch reaches persistent workers too.
        self.epoch = multiprocessing.RawValue("q", 0)

    def _shuffled(self, samples: Iterator, tag: str) -> Iterator:
        if self.shuffle_buffer <= 1:
            return samples
        # initial=bufsize: fill the buffer before the first sample (webdataset's default
        # initial=100 would mix only the first 100 samples of the first shard).
        rng = random.Random(f"shuffle/{tag}")
        return wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)

    def _passes(self, share: list, rng: random.Random, read, tag: str) -> Iterator:
        """Shuffled passes over share, each through its own shuffle buffer drained at the end
        of the pass, so that a pass yields each of its samples once before the next starts."""
        for k, order in enumerate(passes(share, rng)):
            n = 0
            for sample in self._shuffled(read(iter(order)), f"{tag}/{k}"):
                n += 1
                yield sample
            if n == 0:
                raise ShardError(f"no readable samples in {len(order)} shards ({order[0][0]}, ...)")

    def _raw_samples(self, worker: int, workers: int, counts: dict) -> Iterator:
        """This worker's raw samples: its shards in order (eval) or a shuffled stream (train)."""
        tag = f"{self.seed}/{self.epoch.value}/{self.rank}/{worker}"
        patience = 10 * len(self.shards) + 10

        def read(source: Iterator) -> Iterator:
            return stream_samples(source, counts, skip_bad=self.skip_bad_shards,
                                  cache_dir=self.cache_dir, patience=patience)  # fmt: skip

        mine = split_by_rank(self.shards, self.rank, self.world_size)
        if self.steps is None:
            return read(iter(mine[worker::workers]))
        pool, rng = mine or self.shards, random.Random(f"shards/{tag}")
        if self.resample:
            return self._shuffled(read(resampled(pool, rng)), tag)
        return self._passes(pool[worker::workers] or pool, rng, read, tag)

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = worker_context()
        counts = {"decode_errors": 0, "bad_shards": 0}
        train = self.steps is not None
        samples = decoded(self._raw_samples(worker, workers, counts), counts, self.image_size)
        batches = wds.batched(self.batch_size, collation_fn=collate, partial=not train)(samples)
        if train:
            quota = self.steps // workers + (worker < self.steps % workers)
            batches = islice(batches, quota)
        yield from with_counts(batches, counts)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is one image at a time; avoid oversubscribing the cores


class ShardLoader:
    """Iterable of Batch for one rank; `len()` batches per epoch (exact for training)."""

    def __init__(
        self,
        dataset: RankStream,
        *,
        length: int,
        workers: int = 4,
        prefetch_factor: int = 2,
        persistent_workers: bool = False,
    ):
        self.dataset, self.length = dataset, length
        self._stats = {"decode_errors": 0, "bad_shards": 0}
        multi = workers > 0
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=prefetch_factor if multi else None,
            persistent_workers=persistent_workers and multi,
            worker_init_fn=_worker_init if multi else None,
        )

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch.value = epoch

    def stats(self) -> dict:
        """{"decode_errors": n, "bad_shards": n} of the last (or current) epoch."""
        return dict(self._stats)

    def __iter__(self) -> Iterator[Batch]:
        self._stats = {"decode_errors": 0, "bad_shards": 0}
        try:
            for item in self.loader:
                for k, v in item.pop(_STATS, {}).items():
                    self._stats[k] += int(v)
                if "image" in item:
                    yield item
        except (ShardError, DataError) as exn:
            # A worker's error arrives wrapped in its traceback text; keep the one-line message.
            last = str(exn).strip().splitlines()[-1]
            raise type(exn)(
                last.split("Error: ", 1)[-1] if "Traceback" in str(exn) else last
            ) from exn
        if any(self._stats.values()):
            log.warning(
                "histodist.data: epoch %d: %d samples failed to decode and were skipped, "
                "%d bad shards skipped", self.dataset.epoch.value, self._stats["decode_errors"],
                self._stats["bad_shards"],
            )  # fmt: skip


def _eval_length(
    shards: list[tuple[str, int]], rank: int, world: int, workers: int, batch_size: int
) -> int:
    mine = split_by_rank(shards, rank, world)
    w = max(1, workers)
    return sum(math.ceil(sum(n for _, n in mine[i::w]) / batch_size) for i in range(w))


def train_loader(
    shards: str,
    split: str = "train",
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int = 0,
    workers: int = 4,
    shuffle_buffer: int = 2000,
    resample: bool = False,
    image_size: tuple[int, int] | None = None,
    skip_bad_shards: bool = False,
    prefetch_factor: int = 2,
    persistent_workers: bool = False,
    cache_dir: str | None = None,
) -> ShardLoader:
    """Training loader: exactly steps_per_epoch(split samples, world, batch) batches per rank.

    resample=False (default): each worker walks shuffled passes over its own share of the
    rank's shards (one shuffle buffer per pass); when the shards divide evenly
    over ranks x workers and the batch size divides a worker's share, every sample is read
    exactly once per epoch. Otherwise a worker may start a second pass (repeating some samples)
    or stop before the end of its pass (skipping some) this epoch: the step count is fixed so
    that DDP never waits on a rank that ran out of data. resample=True: each worker draws its
    rank's shards with replacement, seeded by (seed, epoch, rank, worker), as webdataset's
    ResampledShards; only for sets of many shards: with 8 shards an epoch reads ~2/3 of them.
    """
    manifest = load_manifest(shards)
    urls = split_shards(manifest, split, shards)
    steps = steps_per_epoch(manifest["splits"][split]["num_samples"], world_size, batch_size)
    ds = RankStream(
        urls,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        steps=steps,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        resample=resample,
        image_size=image_size,
        skip_bad_shards=skip_bad_shards,
        cache_dir=cache_dir,
    )
    return ShardLoader(
        ds,
        length=steps,
        workers=workers,
        prefetch_factor=prefetch_factor,
        persistent_workers=persistent_workers,
    )


def eval_loader(
    shards: str,
    split: str,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    workers: int = 4,
    image_size: tuple[int, int] | None = None,
    skip_bad_shards: bool = False,
    cache_dir: str | None = None,
) -> ShardLoader:
    """Evaluation loader: over all ranks every sample of `split` exactly once, in shard order.

    `len()` counts the batches this rank yields (workers flush their own partial batches);
    ranks may differ, so gather with padding (metrics.gather_varlen).
    """
    manifest = load_manifest(shards)
    urls = split_shards(manifest, split, shards)
    ds = RankStream(
        urls,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        steps=None,
        image_size=image_size,
        skip_bad_shards=skip_bad_shards,
        cache_dir=cache_dir,
    )
    length = _eval_length(urls, rank, world_size, workers, batch_size)
    return ShardLoader(ds, length=length, workers=workers)


def from_urls(
    urls: str | list[str],
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    num_samples: int,
    train: bool = True,
    seed: int = 0,
    workers: int = 4,
    shuffle_buffer: int = 2000,
    resample: bool = False,
    image_size: tuple[int, int] | None = None,
    skip_bad_shards: bool = False,
    prefetch_factor: int = 2,
    persistent_workers: bool = False,
    cache_dir: str | None = None,
) -> ShardLoader:
    """A loader over shards named directly, without a manifest: a list, or webdataset's
    brace / `::` notation ("pipe:aws s3 cp s3://b/pcam/train-{000000..000007}.tar -").

    `num_samples` (the total over the shards) sets the training step count; for evaluation,
    where per-shard counts are unknown, `len()` assumes equal shards and the truncation check
    against the manifest is off.
    """
    expanded = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else list(urls)
    per_shard = num_samples / max(1, len(expanded))
    shards = [(u, 0) for u in expanded]
    steps = steps_per_epoch(num_samples, world_size, batch_size) if train else None
    ds = RankStream(
        shards,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        steps=steps,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        resample=resample,
        image_size=image_size,
        skip_bad_shards=skip_bad_shards,
        cache_dir=cache_dir,
    )
    if train:
        length = steps
    else:
        estimate = [(u, round(per_shard)) for u in expanded]
        length = _eval_length(estimate, rank, world_size, workers, batch_size)
    return ShardLoader(
        ds,
        length=length,
        workers=workers,
        prefetch_factor=prefetch_factor,
        persistent_workers=persistent_workers and train,
    )


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """Copy image/label to `device` with non_blocking=True (overlaps with compute from pinned
    memory); keys and groups stay Python lists."""
    out = dict(batch)
    out["image"] = batch["image"].to(device, non_blocking=True)
    out["label"] = batch["label"].to(device, non_blocking=True)
    return out
