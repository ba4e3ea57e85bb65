"""`python -m histodist.bench loader --shards shards/pcam-sample`: input-pipeline throughput.

Prints images/s, in one run, for
  (a) shards -> uint8 batches (histodist.data.loader.train_loader),
  (b) (a) + the dataset's augmentation preset on the CPU device, in the main process,
  (b2) (a) + the baseline's augmentation done histodist's way: random flips/rotations
      (dihedral, on the uint8 batch) and normalisation, batched, in the main process,
  (c) the hand-written baseline: torchvision ImageFolder + PIL transforms (flips, ToTensor,
      Normalize) + DataLoader, same images, same worker count and batch size,
and compares shard encodings (jpeg as given, png, raw uint8 .npy) for bytes per sample and
single-process read + decode speed, plus the two JPEG decoders (torchvision vs PIL).
Figures, not tests: the numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from histodist.samples import bench_images


def _rate(batches: Iterable, num_batches: int, warmup: int, work=None) -> dict:
    """images/s over num_batches after `warmup` batches (worker start-up, buffer fill)."""
    it: Iterator = iter(batches)
    for _ in range(warmup):
        next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(num_batches):
        b = next(it)
        x = b["image"] if isinstance(b, dict) else b[0]
        if work is not None:
            x = work(x)
        n += x.shape[0]
    dt = time.perf_counter() - t0
    return {"images": n, "seconds": round(dt, 3), "images_per_s": round(n / dt, 1)}


FLIPS = [{"op": "dihedral"}]  # the baseline's random flips, as one batched op


def bench_shards(args, augment: str | list | None) -> dict:
    from histodist import augment as A
    from histodist.data import loader as data

    manifest = data.load_manifest(args.shards)
    loader = data.train_loader(args.shards, args.split, batch_size=args.batch_size, rank=0,
                               world_size=1, workers=args.workers,
                               shuffle_buffer=args.shuffle_buffer)  # fmt: skip
    work = None
    if augment:
        aug = A.build(augment, out_size=manifest["image"]["height"], mean=manifest["mean"],
                      std=manifest["std"])  # fmt: skip
        gen = torch.Generator().manual_seed(0)
        work = lambda x: aug(x, gen)  # noqa: E731
    num = args.augment_batches if augment else args.num_batches
    return _rate(loader.forever(), num, args.warmup, work)


def bench_image_folder(args) -> dict:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from histodist.data import loader as data

    manifest = data.load_manifest(args.shards)
    tf = transforms.Compose([
        transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip(), transforms.ToTensor(),
        transforms.Normalize(manifest["mean"], manifest["std"]),
    ])  # fmt: skip
    ds = datasets.ImageFolder(args.image_folder, transform=tf)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        drop_last=True, persistent_workers=False)  # fmt: skip
    return _rate(loader, args.num_batches, args.warmup)


def _first_samples(shards: str, split: str, n: int) -> list[dict]:
    """The first n raw samples (member bytes) of the split, in shard order."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    from histodist.data import loader as data

    out: list[dict] = []
    for url, _ in data.split_shards(data.load_manifest(shards), split, shards):
        with open(url, "rb") as f:
            files = ({**m, "__url__": url} for m in tar_file_iterator(f))
            for s in group_by_keys(files):
                out.append(s)
                if len(out) == n:
                    return out
    return out


def _reencode(sample: dict, encoding: str) -> dict:
    from PIL import Image

    ext = next(e for e in ("jpg", "jpeg", "png", "tif", "npy") if e in sample)
    keep = {"__key__": sample["__key__"], "cls": sample["cls"], "json": sample.get("json", b"{}")}
    if encoding == "jpeg" and ext in ("jpg", "jpeg"):
        return {**keep, "jpg": sample[ext]}
    arr = np.asarray(Image.open(io.BytesIO(sample[ext])).convert("RGB"))
    buf = io.BytesIO()
    if encoding == "png":
        Image.fromarray(arr).save(buf, format="PNG")
        return {**keep, "png": buf.getvalue()}
    np.save(buf, arr, allow_pickle=False)
    return {**keep, "npy": buf.getvalue()}


def _write(out: Path, samples: list[dict], per_shard: int) -> int:
    """Shards laid out like histodist.shard's (ustar headers, mtime 0); returns total bytes."""
    import tarfile

    shards, total = [], 0
    for i in range(0, len(samples), per_shard):
        name, chunk = f"train-{i // per_shard:06d}.tar", samples[i : i + per_shard]
        with tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT) as tf:
            for s in chunk:
                for ext in sorted(k for k in s if not k.startswith("__")):
                    info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                    info.size, info.mode = len(s[ext]), 0o444
                    tf.addfile(info, io.BytesIO(s[ext]))
        size = (out / name).stat().st_size
        total += size
        shards.append({"name": name, "num_samples": len(chunk), "bytes": size})
    manifest = {"format": "histodist-shards/1", "classes": ["0", "1"],
                "splits": {"train": {"num_samples": len(samples), "shards": shards}}}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest))
    return total


def bench_encodings(args) -> list[dict]:
    """Per encoding: bytes per sample, read+decode images/s in one process (the per-core cost)
    and through train_loader with --workers workers (what training gets)."""
    from histodist.data import loader as data

    samples = _first_samples(args.shards, args.split, args.encoding_samples)
    rows = []
    with tempfile.TemporaryDirectory(prefix="histodist-bench-") as tmp:
        for enc in ("jpeg", "png", "raw"):
            out = Path(tmp) / enc
            out.mkdir()
            nbytes = _write(out, [_reencode(s, enc) for s in samples], 500)
            loader = data.eval_loader(str(out), "train", batch_size=args.batch_size, rank=0,
                                      world_size=1, workers=0)  # fmt: skip
            one = 0.0
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                n = sum(b["image"].shape[0] for b in loader)
                one = max(one, n / (time.perf_counter() - t0))
            # One long epoch over the few shards (resampled), so the timed batches do not
            # include per-epoch worker start-up and shuffle-buffer fills.
            urls = sorted(str(p) for p in out.glob("*.tar"))
            total = args.batch_size * (args.num_batches + args.warmup + 1)
            loader = data.from_urls(urls, batch_size=args.batch_size, rank=0, world_size=1,
                                    num_samples=total, workers=args.workers,
                                    shuffle_buffer=args.shuffle_buffer)  # fmt: skip
            multi = max(_rate(loader.forever(), args.num_batches, args.warmup)["images_per_s"]
                        for _ in range(args.repeats))  # fmt: skip
            rows.append({"encoding": enc, "bytes_per_sample": round(nbytes / n),
                         "images_per_s_1proc": round(one, 1),
                         "images_per_s_workers": multi})  # fmt: skip
    return rows


def bench_jpeg_decoders(args) -> list[dict]:
    """torchvision.io.decode_image vs PIL + numpy on the same JPEG bytes, one core."""
    import warnings

    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image

    warnings.filterwarnings("ignore", message=".*TorchVision are deprecated.*")
    jpegs = [s["jpg"] for s in _first_samples(args.shards, args.split, args.encoding_samples)
             if "jpg" in s]  # fmt: skip
    decoders = {
        "torchvision.io.decode_image": lambda d: decode_image(
            torch.frombuffer(bytearray(d), dtype=torch.uint8), ImageReadMode.RGB),
        "PIL + numpy": lambda d: torch.from_numpy(
            np.array(Image.open(io.BytesIO(d)).convert("RGB"))).permute(2, 0, 1),
    }  # fmt: skip
    rows = []
    for name, fn in decoders.items():
        t0 = time.perf_counter()
        for d in jpegs:
            fn(d)
        rows.append(
            {"decoder": name, "images_per_s": round(len(jpegs) / (time.perf_counter() - t0), 1)}
        )
    return rows


def warm_page_cache(args) -> float:
    """Read every shard of the split and every baseline image once, so that neither side of
    the comparison pays for cold disk reads. Returns the seconds it took."""
    from histodist.data import loader as data

    t0 = time.perf_counter()
    manifest = data.load_manifest(args.shards)
    files = [Path(u) for u, _ in data.split_shards(manifest, args.split, args.shards)]
    files += [p for p in Path(args.image_folder).rglob("*") if p.is_file()]
    for path in files:
        if path.is_file():  # remote shards cannot be warmed here
            path.read_bytes()
    return round(time.perf_counter() - t0, 1)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m histodist.bench loader", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--shards", default="shards/pcam-sample", help="shard folder (manifest.json)")
    p.add_argument("--split", default="train")
    p.add_argument("--image-folder", default=bench_images("train"),
                   help="the same images as an ImageFolder tree, for the baseline (c)")  # fmt: skip
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-batches", type=int, default=40, help="timed batches per loader")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs; the best counts")
    p.add_argument("--shuffle-buffer", type=int, default=2000)
    p.add_argument("--augment", default="pcam", help="augmentation preset for (b)")
    p.add_argument("--augment-batches", type=int, default=10,
                   help="timed batches for (b), slow on a CPU")  # fmt: skip
    p.add_argument("--encoding-samples", type=int, default=2000)
    p.add_argument("--skip-encodings", action="store_true")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv if argv is not None else [])
    torch.set_num_threads(max(1, args.workers))
    res = {"machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                       "torch": torch.__version__, "cuda": torch.cuda.is_available()},
           "config": vars(args)}  # fmt: skip
    res["warm_cache_s"] = warm_page_cache(args)
    runs = {
        "a_shards_uint8": lambda: bench_shards(args, augment=None),
        "b_shards_uint8_augment_cpu": lambda: bench_shards(args, augment=args.augment),
        "b2_shards_flips_normalize_cpu": lambda: bench_shards(args, augment=FLIPS),
        "c_imagefolder_pil": lambda: bench_image_folder(args),
    }
    # Interleaved repeats, best of each: other load on a shared machine only slows runs down.
    for _ in range(args.repeats):
        for key, run in runs.items():
            r = run()
            best = res.get(key)
            res[key] = r if best is None or r["images_per_s"] > best["images_per_s"] else best
            res.setdefault(key + "_all", []).append(r["images_per_s"])
    c = res["c_imagefolder_pil"]["images_per_s"]
    res["speedup_a_over_c"] = round(res["a_shards_uint8"]["images_per_s"] / c, 2)
    res["speedup_b2_over_c"] = round(res["b2_shards_flips_normalize_cpu"]["images_per_s"] / c, 2)
    if not args.skip_encodings:
        res["encodings"] = bench_encodings(args)
        res["jpeg_decoders"] = bench_jpeg_decoders(args)
    res["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    _print(res, args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


def _print(res: dict, args) -> None:
    m = res["machine"]
    print(
        f"histodist loader benchmark: {m['cpus']} CPUs (load {m['load_avg_1m']}), "
        f"workers={args.workers}, batch={args.batch_size}, {args.num_batches} timed batches"
    )
    print(f"{'pipeline':52s} {'images/s':>10s}")
    for key, label in [
        ("a_shards_uint8", "(a) shards -> uint8 batches"),
        ("b_shards_uint8_augment_cpu", f"(b) (a) + '{args.augment}' augment, CPU"),
        ("b2_shards_flips_normalize_cpu", "(b2) (a) + flips/rotations + normalise, CPU"),
        ("c_imagefolder_pil", "(c) ImageFolder + PIL transforms + DataLoader"),
    ]:
        print(f"{label:52s} {res[key]['images_per_s']:10.1f}")
    print(
        f"(a) / (c) = {res['speedup_a_over_c']:.2f}x, like for like (b2) / (c) = "
        f"{res['speedup_b2_over_c']:.2f}x   (best of {args.repeats}; load at end "
        f"{m['load_avg_1m_end']})"
    )
    if "encodings" in res:
        print(
            f"\n{'encoding':10s} {'bytes/sample':>13s} {'img/s, 1 process':>17s} "
            f"{f'img/s, (a) with {args.workers} workers':>28s}"
        )
        for r in res["encodings"]:
            print(
                f"{r['encoding']:10s} {r['bytes_per_sample']:13d} "
                f"{r['images_per_s_1proc']:17.1f} {r['images_per_s_workers']:28.1f}"
            )
        print(f"\n{'JPEG decoder':30s} {'images/s (1 core)':>18s}")
        for r in res["jpeg_decoders"]:
            print(f"{r['decoder']:30s} {r['images_per_s']:18.1f}")
