"""Shards -> uint8 batches for ONE rank (rank and world size are passed in; no augmentation).

The pipeline is a list of small webdataset-style stages run inside each DataLoader worker:

    training: the epoch's plan (histodist.data.epoch_plan: sample ranges of shards per rank and
    worker) | resampled shards -> open + untar from the range's start -> group members by key
    -> shuffle buffer -> decode to uint8 (3,H,W) -> batch
    evaluation: shard URLs -> split by rank -> split by worker -> open + untar -> ... -> batch

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
import os
import random
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from itertools import chain, islice

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, group_by_keys

from histodist import samples
from histodist.data import embeddings, epoch_plan
from histodist.data import workers as worker_procs
from histodist.data.remote import ShardError, join_url, open_url, plain_name_problem, read_text
from histodist.data.tarstream import DigestReader, iter_tar
from histodist.errors import HistodistError
from histodist.fileio import IMAGE_EXTENSIONS, check_image_size

Batch = dict  # "image": uint8 (B,3,H,W) channels_last, "label": int64 (B,), "key", "group", "meta": lists

# shard member extensions decoded as images: the raw image files, PPM, and uint8 .npy arrays
IMAGE_EXTS = (*(e[1:] for e in IMAGE_EXTENSIONS), "ppm", "npy")
_TV_EXTS = {"jpg", "jpeg", "png", "webp"}  # torchvision decodes these; PIL does the rest
log = logging.getLogger(__name__)
_STATS = "__histodist_stats__"  # marker item a worker yields at the end of its epoch


class DataError(HistodistError, ValueError):
    """Inconsistent data in shards (e.g. images of different sizes without image_size)."""


def load_manifest(shards: str) -> dict:
    """Read and check `manifest.json` of a shard folder or URL base (file://, http(s)://,
    pipe:). Raises ShardError naming the file: missing (with the command that makes shards),
    not JSON, or not the schema histodist.shard writes."""
    url = join_url(shards, "manifest.json")
    try:
        text = read_text(url)
    except ShardError:
        if "://" in url or url.startswith("pipe:") or os.path.exists(url):
            raise
        raise ShardError(
            f"{url}: no such file; make the shards with {_shard_hint(shards)}"
        ) from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exn:
        raise ShardError(f"{url}: not valid JSON ({exn}); re-run histodist.shard") from exn
    problem = _manifest_problem(manifest)
    if problem:
        raise ShardError(
            f"{url}: not a histodist shard manifest ({problem}); re-run histodist.shard"
        )
    _check_shard_names(manifest, url)
    return manifest


def _check_shard_names(manifest: dict, url: str) -> None:
    """Every shard name must be a file name of the manifest's folder, checked before any shard
    is opened: a manifest arrives with the shards (a collaborator's folder, a web server), so a
    name in it must never run a `pipe:` command, fetch a URL or reach outside the folder."""
    for split, s in manifest["splits"].items():
        for i, e in enumerate(s["shards"]):
            bad = plain_name_problem(e["name"])
            if bad:
                raise ShardError(
                    f"{url}: splits.{split}.shards[{i}].name {e['name']!r} is not a file name "
                    f"of the shard folder ({bad}); pipe: commands and URLs go in --shards only"
                )


def _shard_hint(shards: str) -> str:
    """The histodist.shard command that writes shards to `shards` (its folder name as the
    dataset when it is one, as in the presets' shards/<dataset>); for PCam also the command
    that shards the sample bundled in examples/, so a first run has a way forward offline."""
    name = os.path.basename(os.path.normpath(shards))
    if name == "pcam-mini":
        return f"`{samples.pcam_mini_command(shards)}`"
    if name == "pcam":
        mini = os.path.join(os.path.dirname(os.path.normpath(shards)), "pcam-mini")
        return (
            f"`python -m histodist.shard --dataset pcam --download --out {shards}` (the real "
            f"PCam, 327,680 patches), or try the 1,000-patch sample in histodist's examples/: "
            f"`{samples.pcam_mini_command(mini)}`, then pass `--shards {mini}`"
        )
    known = ("kaggle-hcd", "idc", "breakhis", "ham10000", "folder")
    dataset = name if name in known else "DATASET"
    return f"`python -m histodist.shard --dataset {dataset} --src RAW_FOLDER --out {shards}`"


def _manifest_problem(m) -> str | None:
    """What in a parsed manifest breaks the schema the loaders rely on, or None."""
    if not isinstance(m, dict):
        return f"top level is a {type(m).__name__}, want an object"
    if not str(m.get("format", "")).startswith("histodist-shards/"):
        return f"format={m.get('format')!r}"
    classes, splits = m.get("classes"), m.get("splits")
    if not isinstance(classes, list):
        return "'classes' must be a list"
    if not isinstance(splits, dict) or not splits:
        return "'splits' must be an object of splits"
    labelled = [k for k, s in splits.items() if isinstance(s, dict) and s.get("class_counts")]
    if not classes and labelled:  # only a set without labels (slide tiles for prediction) has none
        return f"'classes' is empty but split {labelled[0]!r} has class counts"
    for name, split in splits.items():
        where = f"splits.{name}"
        if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
            return f"{where} needs a 'shards' list"
        if not _count(split.get("num_samples")):
            return f"{where}.num_samples must be a non-negative integer"
        counts = split.get("class_counts")  # None: an unlabelled split (Kaggle's test, slides)
        if counts is not None and not (isinstance(counts, list) and len(counts) == len(classes)):
            return f"{where}.class_counts must list one count per class, or be null"
        if counts is not None and not all(map(_count, counts)):
            return f"{where}.class_counts must be non-negative integers"
        for i, e in enumerate(split["shards"]):
            if not (isinstance(e, dict) and isinstance(e.get("name"), str) and e["name"]):
                return f"{where}.shards[{i}] needs a 'name'"
            if not _count(e.get("num_samples")):
                return f"{where}.shards[{i}].num_samples must be a non-negative integer"
        held = sum(e["num_samples"] for e in split["shards"])
        if held != split["num_samples"]:  # the epoch plan counts one, the readers the other
            return f"{where}.num_samples is {split['num_samples']}, its shards hold {held}"
    return None


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


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


def shard_digests(manifest: dict, split: str, shards: str) -> dict[str, str]:
    """{shard url: sha256 recorded by histodist.shard} of a split (for verify_shards)."""
    entries = manifest["splits"][split]["shards"]
    return {join_url(shards, e["name"]): e["sha256"] for e in entries if e.get("sha256")}


def shard_samples(
    shard: tuple[str, int],
    counts: dict,
    *,
    skip_bad: bool,
    cache_dir: str | None,
    start: int = 0,
    digest: str | None = None,
):
    """Open one shard and yield its raw samples (dict of member bytes keyed by extension),
    from sample number `start` on (the samples before it are passed over, not decoded).

    A shard that cannot be opened, is truncated, or holds fewer or more samples than the
    manifest says (`shard`'s count; 0: unknown, not checked) raises ShardError naming it; with `skip_bad` its URL joins the set counts["bad_shards"]
    instead (samples read before the damage are kept). `digest`: the manifest's sha256 of the
    shard, checked over the bytes as they stream (the samples before `start` are then read
    through, not seeked over); a mismatch is found at the end of the shard, after its samples
    were yielded (holding a shard back until then would cost its size in memory per worker),
    and raises ShardError (or counts a bad shard). A reader that stops before the end of the
    shard (a training worker whose sample range ends inside it) checks nothing: the worker
    whose range holds the shard's last sample does.
    """
    url, expected = shard
    n = start
    try:
        stream = open_url(url, cache_dir=cache_dir)
        if digest:
            stream = DigestReader(stream)
        try:
            members = iter_tar(stream, skip=_first_samples(start))
            files = ({"fname": name, "data": data, "__url__": url} for name, data in members)
            for sample in group_by_keys(files):
                n += 1
                if expected and n > expected:  # else the plan never reads the extra samples
                    raise ShardError(
                        f"{url}: holds more samples than the {expected} manifest.json says; "
                        "re-create the shards with histodist.shard (or correct the manifest)"
                    )
                yield sample
            actual = stream.hexdigest() if digest else None
        finally:
            stream.close()
        if expected and n < expected:
            raise ShardError(f"{url}: {n} samples, manifest says {expected} (truncated?)")
        if actual != digest:
            raise ShardError(
                f"{url}: sha256 differs from the manifest (bytes changed after histodist.shard "
                "wrote it; its samples were read); re-create it or pass --skip-bad-shards"
            )
    except Exception as exn:
        if not skip_bad:
            if isinstance(exn, ShardError):
                raise
            raise ShardError(
                f"bad shard {url}: {type(exn).__name__}: {exn}; re-create it or pass "
                "--skip-bad-shards"
            ) from exn
        counts["bad_shards"].add(url)
        warnings.warn(f"skipping bad shard {url}: {exn}", stacklevel=1)


def _first_samples(n: int) -> Callable[[str], bool] | None:
    """Tar member names -> True for the members of the first n samples, keyed as webdataset's
    group_by_keys keys them (a new sample starts where the key changes)."""
    if n <= 0:
        return None
    state = {"key": None, "seen": 0}

    def skip(name: str) -> bool:
        if state["seen"] > n:
            return False
        key, _ = base_plus_ext(name)
        if key is not None and key != state["key"]:
            state["key"], state["seen"] = key, state["seen"] + 1
        return state["seen"] <= n

    return skip


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
        check_image_size(w, h)
        start = 10 + int.from_bytes(data[8:10], "little")
        if len(data) - start != h * w * c:
            raise DataError(f".npy payload of {len(data) - start} bytes for shape {(h, w, c)}")
        t = torch.frombuffer(bytearray(data[start:]), dtype=torch.uint8).view(h, w, c)
    else:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            raise DataError(f".npy image of dtype {arr.dtype}, shape {arr.shape}: want uint8 HxWx3")
        check_image_size(arr.shape[1], arr.shape[0])
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


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, or None when `data` is no PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame marker, or None when `data` is no JPEG
    or it cannot be found."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0..SOF15
            return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(
                data[i + 5 : i + 7], "big"
            )
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding: PNG and JPEG parsed here
    (1-2 us; PIL's lazy open took 17 us against 90 us for the decode of a PCam JPEG), other
    formats by PIL's open, which reads only the header."""
    size = _png_size(data) or _jpeg_size(data)
    if size is None:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            size = im.size
    return size


def _decode_image(ext: str, data: bytes) -> torch.Tensor:
    """Encoded bytes -> uint8 (3,H,W), possibly a strided view (collate copies it once).
    An image over fileio.MAX_IMAGE_PIXELS raises ValueError before it is decoded. Nothing is
    ever unpickled."""
    if ext == "npy":
        return _decode_npy(data)
    decode = _torchvision_decoder() if ext in _TV_EXTS else None
    if decode is not None:
        check_image_size(*_header_size(data))  # torchvision has no pixel limit of its own
        # bytearray: torch.frombuffer wants a writable buffer
        return decode(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:  # the header only, so far
        check_image_size(*im.size)
        arr = np.array(im.convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1)


def _resize_uint8(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    x = img.unsqueeze(0).float()
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0]


def decode_sample(raw: dict, image_size: tuple[int, int] | None) -> dict:
    """Raw member bytes -> {"image": uint8 (3,H,W), "label": int, "key": str, "group": str|None,
    "meta": dict} (`meta`: the sample's whole `.json`, e.g. a tile's slide id and coordinates).

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
    return {"image": img, "label": label, "key": raw["__key__"], "group": meta.get("group"),
            "meta": meta}  # fmt: skip


def decoded(
    samples: Iterable[dict], counts: dict, image_size, num_classes: int | None = None
) -> Iterator[dict]:
    """Decode stage: a sample that fails to decode is skipped and counted. A label outside
    the manifest's `num_classes` classes (-1: unlabelled) raises DataError naming the shard
    and key: the loss would fail on it mid-epoch, and a skip would hide a mislabelled set."""
    for raw in samples:
        try:
            sample = decode_sample(raw, image_size)
        except Exception as exn:
            counts["decode_errors"] += 1
            if counts["decode_errors"] <= 3:  # a few messages, the total goes to stats()
                warnings.warn(
                    f"skipping {raw.get('__url__')}:{raw.get('__key__')}: {exn}", stacklevel=1
                )
            continue
        if num_classes is not None and not -1 <= sample["label"] < num_classes:
            raise DataError(
                f"{raw.get('__url__')}: sample {raw.get('__key__')}: .cls {sample['label']} is "
                f"not a class of the manifest's {num_classes} (0..{num_classes - 1}); fix or "
                "re-create the shard"
            )
        yield sample


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
        "meta": [s["meta"] for s in samples],
    }


def with_counts(batches: Iterable[Batch], counts: dict) -> Iterator[Batch]:
    """Attach the errors counted since the previous batch (decode errors: a number, bad
    shards: the URLs newly found bad); a final marker carries the rest."""
    sent_errors, sent_bad = 0, set()

    def news() -> dict:
        nonlocal sent_errors, sent_bad
        new = {"decode_errors": counts["decode_errors"] - sent_errors,
               "bad_shards": sorted(counts["bad_shards"] - sent_bad)}  # fmt: skip
        sent_errors, sent_bad = counts["decode_errors"], set(counts["bad_shards"])
        return new

    for batch in batches:
        batch[_STATS] = news()
        yield batch
    yield {_STATS: news()}


def stream_samples(
    source: Iterator, counts: dict, *, skip_bad: bool, cache_dir, patience: int, digests=None
):
    """Raw samples of every shard `source` yields; stops an endless stream of bad shards.
    `digests`: {url: sha256} to check each shard against (verify_shards), or None."""
    empty = 0
    for shard in source:
        n = 0
        digest = digests.get(shard[0]) if digests else None
        for sample in shard_samples(
            shard, counts, skip_bad=skip_bad, cache_dir=cache_dir, digest=digest
        ):
            n += 1
            yield sample
        empty = 0 if n else empty + 1
        if empty > patience:  # resampling would otherwise spin forever on unreadable shards
            raise ShardError(f"{empty} shards in a row gave no samples (last: {shard[0]})")


# ----------------------------------------------------------------------------- dataset
class RankStream(IterableDataset):
    """The per-rank pipeline; each DataLoader worker runs `__iter__` on its own copy.

    Training (`steps` set), default: the worker reads its pieces of the epoch's plan
    (histodist.data.epoch_plan, computed alike on every rank from `sizes`, seed and epoch), through
    a shuffle buffer filled to its full size before the first sample; over all ranks and
    workers every sample is read once except the drop-last remainder, and the rank yields
    exactly `steps` batches. Samples lost to decode errors or skipped bad shards are made up
    from whole shards of the split, read in passes seeded by (seed, epoch, rank, worker).
    `resample`: shards r::world for rank r (all shards when there are fewer shards than
    ranks), drawn with replacement per worker with that seed.
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
        digests: dict[str, str] | None = None,
        sizes: list[int] | None = None,
        num_classes: int | None = None,
    ):
        super().__init__()
        if not shards:
            raise ShardError("no shards to read")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.shards, self.rank, self.world_size = shards, rank, world_size
        # Samples per shard for the plan: the manifest's counts (from_urls passes estimates).
        self.sizes = [n for _, n in shards] if sizes is None else list(sizes)
        if steps is not None and not resample and not any(self.sizes):
            raise ShardError(f"no samples to plan an epoch over ({shards[0][0]}, ...)")
        self.batch_size, self.steps, self.seed = batch_size, steps, seed
        self.shuffle_buffer, self.resample, self.image_size = shuffle_buffer, resample, image_size
        self.skip_bad_shards, self.cache_dir = skip_bad_shards, cache_dir
        self.digests = digests  # {url: sha256} to check while streaming, or None
        self.num_classes = num_classes  # labels must lie in [0, num_classes) (or be -1)
        # Shared memory, so set_epoch reaches persistent workers too.
        self.epoch = multiprocessing.RawValue("q", 0)

    def plan(self, workers: int, epoch: int | None = None) -> epoch_plan.Plan:
        """The training epoch's plan[rank][worker] (the current epoch unless given)."""
        return epoch_plan.plan_epoch(
            self.sizes,
            world_size=self.world_size,
            batch_size=self.batch_size,
            steps=self.steps or 1,
            workers=workers,
            seed=self.seed,
            epoch=self.epoch.value if epoch is None else epoch,
        )

    def describe(self, workers: int) -> str:
        """One line: how the split is divided between ranks and workers."""
        n, k = sum(self.sizes), max(1, workers)
        if self.steps is None:
            return (f"{n:,} samples in {len(self.shards)} shards -> {self.world_size} ranks x "
                    f"{k} workers by whole shards, each sample once")  # fmt: skip
        if self.resample:
            return (f"{n:,} samples in {len(self.shards)} shards, drawn with replacement by "
                    f"{self.world_size} ranks x {k} workers, {self.steps} batches of "
                    f"{self.batch_size} per rank")  # fmt: skip
        return epoch_plan.describe(self.plan(workers, epoch=0), self.sizes,
                                   batch_size=self.batch_size, steps=self.steps, workers=workers)  # fmt: skip

    def _shuffled(self, samples: Iterator, tag: str) -> Iterator:
        if self.shuffle_buffer <= 1:
            return samples
        # initial=bufsize: fill the buffer before the first sample (webdataset's default
        # initial=100 would mix only the first 100 samples of the first shard).
        rng = random.Random(f"shuffle/{tag}")
        return wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)

    def _read_pieces(self, pieces: list[epoch_plan.Piece], counts: dict) -> Iterator:
        """Raw samples of each piece: its shard from `start` on, closed after `stop`. A piece
        that ends at its shard's end (by the manifest's count) reads on to the end of the file,
        so that the end-of-shard checks run: the sample count (a manifest that under-counts a
        shard would leave its last samples unread and the epoch made up with repeats) and,
        with verify_shards, the digest."""
        for p in pieces:
            url, expected = self.shards[p.shard]
            digest = self.digests.get(url) if self.digests else None
            samples = shard_samples(self.shards[p.shard], counts, skip_bad=self.skip_bad_shards,
                                    cache_dir=self.cache_dir, start=p.start, digest=digest)  # fmt: skip
            with closing(samples):
                if not (expected and p.stop >= expected):
                    yield from islice(samples, len(p))
                    continue
                yield from islice(samples, len(p) - 1)
                last = next(samples, None)
                next(samples, None)  # the end-of-shard checks, digest included, run here:
                if last is not None:  # before the last sample, after which a worker may stop
                    yield last

    def _raw_samples(self, worker: int, workers: int, counts: dict) -> Iterator:
        """This worker's raw samples: its shards in order (eval) or its training stream."""
        tag = f"{self.seed}/{self.epoch.value}/{self.rank}/{worker}"
        patience = 10 * len(self.shards) + 10

        def read(source: Iterator) -> Iterator:
            return stream_samples(source, counts, skip_bad=self.skip_bad_shards,
                                  cache_dir=self.cache_dir, patience=patience,
                                  digests=self.digests)  # fmt: skip

        mine = split_by_rank(self.shards, self.rank, self.world_size)
        if self.steps is None:
            return read(iter(mine[worker::workers]))
        rng = random.Random(f"shards/{tag}")
        if self.resample:
            return self._shuffled(read(resampled(mine or self.shards, rng)), tag)
        pieces = self.plan(workers)[self.rank][worker]
        planned = self._shuffled(self._read_pieces(pieces, counts), tag)
        # Read only when samples went missing (decode errors, bad shards, from_urls estimates).
        return chain(planned, read(chain.from_iterable(passes(self.shards, rng))))

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = worker_context()
        counts = {"decode_errors": 0, "bad_shards": set()}
        train = self.steps is not None
        samples = decoded(self._raw_samples(worker, workers, counts), counts, self.image_size,
                          self.num_classes)  # fmt: skip
        if train:  # exactly the quota's samples: batched() pulls one more before yielding a batch
            quota = epoch_plan.worker_quotas(self.steps, workers)[worker]
            samples = islice(samples, quota * self.batch_size)
        batches = wds.batched(self.batch_size, collation_fn=collate, partial=not train)(samples)
        yield from with_counts(batches, counts)


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
        self.dataset, self.length, self.workers = dataset, length, workers
        self._errors, self._bad = 0, set()  # decode errors, URLs of bad shards skipped
        multi = workers > 0
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=prefetch_factor if multi else None,
            persistent_workers=persistent_workers and multi,
            worker_init_fn=worker_procs.init if multi else None,
        )

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch.value = epoch

    def stats(self) -> dict:
        """{"decode_errors": n, "bad_shards": n} of the last (or current) epoch; a bad shard
        counts once, however many workers and passes met it."""
        return {"decode_errors": self._errors, "bad_shards": len(self._bad)}

    def describe(self) -> str:
        """One line: shards per rank, workers used, samples per epoch (see RankStream)."""
        return self.dataset.describe(self.workers)

    def forever(self, epoch: int = 0) -> Iterator[Batch]:
        """Batches of epochs `epoch`, `epoch` + 1, ... without end (a range test or a benchmark
        that needs more batches than a small split holds)."""
        while True:
            self.set_epoch(epoch)
            yield from self
            epoch += 1

    def __iter__(self) -> Iterator[Batch]:
        self._errors, self._bad = 0, set()
        batches = iter(self.loader)
        worker_procs.track(batches)
        try:
            for item in batches:
                news = item.pop(_STATS, {})
                self._errors += int(news.get("decode_errors", 0))
                self._bad.update(news.get("bad_shards", ()))
                if "image" in item:
                    yield item
        except (ShardError, DataError) as exn:
            # A worker's error arrives wrapped in its traceback text; keep the one-line message.
            last = str(exn).strip().splitlines()[-1]
            raise type(exn)(
                last.split("Error: ", 1)[-1] if "Traceback" in str(exn) else last
            ) from exn
        finally:
            # An epoch that ends early (an error here or in the training loop, a consumer that
            # stops) ends its workers now, not at garbage collection: see histodist.data.workers.
            if not self.loader.persistent_workers:
                worker_procs.stop(batches)
        if self._errors or self._bad:
            log.warning(
                "histodist.data.loader: epoch %d: %d samples failed to decode and were skipped, "
                "%d bad shards skipped", self.dataset.epoch.value, self._errors, len(self._bad),
            )  # fmt: skip


def _eval_length(
    shards: list[tuple[str, int]], rank: int, world: int, workers: int, batch_size: int
) -> int:
    mine = split_by_rank(shards, rank, world)
    w = max(1, workers)
    return sum(math.ceil(sum(n for _, n in mine[i::w]) / batch_size) for i in range(w))


@dataclass(frozen=True)
class LoaderOptions:
    """How one rank reads shards: the keyword arguments of train_loader, eval_loader and
    from_urls. The training-only ones (seed, shuffle_buffer, resample, prefetch_factor,
    persistent_workers) do not apply to evaluation, which reads every sample once in order."""

    batch_size: int
    rank: int
    world_size: int
    seed: int = 0
    workers: int = 4
    shuffle_buffer: int = 2000
    resample: bool = False
    image_size: tuple[int, int] | None = None
    skip_bad_shards: bool = False
    prefetch_factor: int = 2
    persistent_workers: bool = False
    cache_dir: str | None = None
    verify_shards: bool = False


def _loader(
    o: LoaderOptions, shards: list[tuple[str, int]], *, steps: int | None, length: int, **kw
) -> ShardLoader:
    """The rank's RankStream over `shards` and its ShardLoader (`kw`: digests, sizes,
    num_classes)."""
    ds = RankStream(
        shards, rank=o.rank, world_size=o.world_size, batch_size=o.batch_size, steps=steps,
        seed=o.seed, shuffle_buffer=o.shuffle_buffer, resample=o.resample,
        image_size=o.image_size, skip_bad_shards=o.skip_bad_shards, cache_dir=o.cache_dir, **kw,
    )  # fmt: skip
    # Evaluation loaders are short-lived (one pass): persistent workers would only hold memory.
    return ShardLoader(
        ds, length=length, workers=o.workers, prefetch_factor=o.prefetch_factor,
        persistent_workers=o.persistent_workers and steps is not None,
    )  # fmt: skip


def train_loader(shards: str, split: str = "train", **options) -> ShardLoader:
    """Training loader: exactly steps_per_epoch(split samples, world, batch) batches per rank;
    `options`: the LoaderOptions fields (batch_size, rank and world_size required).

    resample=False (default): the epoch's plan (histodist.data.epoch_plan) gives each rank and
    worker sample ranges of the shards, from the manifest's per-shard counts: whatever the
    numbers of shards, ranks and workers, an epoch reads every sample once except the
    drop-last remainder (fewer than world x batch samples), and the same (seed, epoch, world,
    workers) give the same order. `describe()` says how the split is divided.
    resample=True: each worker draws its rank's shards with replacement, seeded by (seed,
    epoch, rank, worker), as webdataset's ResampledShards; only for sets of many shards: with
    8 shards an epoch reads ~2/3 of them.
    """
    o = LoaderOptions(**options)
    manifest = load_manifest(shards)
    urls = split_shards(manifest, split, shards)
    steps = steps_per_epoch(manifest["splits"][split]["num_samples"], o.world_size, o.batch_size)
    digests = shard_digests(manifest, split, shards) if o.verify_shards else None
    return _loader(o, urls, steps=steps, length=steps, digests=digests,
                   num_classes=len(manifest["classes"]))  # fmt: skip


def eval_loader(shards: str, split: str, **options) -> ShardLoader:
    """Evaluation loader: over all ranks every sample of `split` exactly once, in shard order;
    `options`: the LoaderOptions fields (batch_size, rank and world_size required).

    `len()` counts the batches this rank yields (workers flush their own partial batches);
    ranks may differ, so gather with padding (histodist.training.distributed.gather_varlen).
    """
    o = LoaderOptions(**options)
    manifest = load_manifest(shards)
    urls = split_shards(manifest, split, shards)
    length = _eval_length(urls, o.rank, o.world_size, o.workers, o.batch_size)
    digests = shard_digests(manifest, split, shards) if o.verify_shards else None
    return _loader(o, urls, steps=None, length=length, digests=digests,
                   num_classes=len(manifest["classes"]))  # fmt: skip


def from_urls(
    urls: str | list[str], *, num_samples: int, train: bool = True, **options
) -> ShardLoader:
    """A loader over shards named directly, without a manifest: a list, or webdataset's
    brace / `::` notation ("pipe:aws s3 cp s3://b/pcam/train-{000000..000007}.tar -");
    `options`: the LoaderOptions fields (verify_shards needs a manifest: not available).

    `num_samples` (the total over the shards) sets the training step count. Per-shard counts
    are unknown, so the plans assume equal shards (num_samples spread evenly): the training
    plan is exact when the shards are equal; otherwise a worker whose range runs past the end
    of a smaller shard makes up its batches from whole shards (repeating a few samples) and
    the tail of a larger one is not read. For evaluation `len()` assumes equal shards; the
    truncation check against the manifest is off.
    """
    o = LoaderOptions(**options)
    if o.verify_shards:
        raise TypeError("from_urls: verify_shards needs the manifest's digests")
    expanded = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else list(urls)
    per_shard = num_samples / max(1, len(expanded))
    even = [num_samples // len(expanded) + (i < num_samples % len(expanded))
            for i in range(len(expanded))]  # fmt: skip
    steps = steps_per_epoch(num_samples, o.world_size, o.batch_size) if train else None
    if train:
        length = steps
    else:
        estimate = [(u, round(per_shard)) for u in expanded]
        length = _eval_length(estimate, o.rank, o.world_size, o.workers, o.batch_size)
    return _loader(o, [(u, 0) for u in expanded], steps=steps, length=length, sizes=even)


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """Copy image/label to `device` with non_blocking=True (overlaps with compute from pinned
    memory); keys and groups stay Python lists."""
    out = dict(batch)
    out["image"] = batch["image"].to(device, non_blocking=True)
    out["label"] = batch["label"].to(device, non_blocking=True)
    return out
