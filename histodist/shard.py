"""`python -m histodist.shard`: a raw dataset -> WebDataset tar shards + manifest.json + _info.json.

    python -m histodist.shard --dataset folder --src ../shared/data/pcam-jpeg --out shards/pcam-sample
    python -m histodist.shard --dataset pcam --download --out shards/pcam
    python -m histodist.shard --verify shards/pcam
    python -m histodist.shard --dataset wsi --src slides/ --mpp 0.5 --tile-size 224 --out shards/x

The format is described in docs/shards.md. Splits: official ones are kept; otherwise a
deterministic class-stratified split at the patient / lesion / slide level (sources/split.py).
Shards are written in parallel, each by one worker, under a temporary name then renamed;
a re-run reuses shards that are complete and unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import shlex
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from histodist.data.remote import ShardError  # a shard or manifest problem; the message names it
from histodist.errors import UsageError, fraction, integer, positive, run_cli
from histodist.fileio import atomic_write, file_digest
from histodist.ingest import imageio, outdir, sources
from histodist.ingest.slides import claim, ranks, sharding
from histodist.ingest.sources import FileReader, Item, Scan, SourceOptions
from histodist.ingest.sources.split import split_items
from histodist.ingest.sources.wsi import WsiOptions, wsi_options
from histodist.ingest.writer import ShardTask, read_shard_keys, write_shard
from histodist.version import version_string

FORMAT = "histodist-shards/1"
SHARD_BYTES = 256 << 20  # default target: inside the 100-500 MB range WebDataset readers like
MIN_SHARDS = 8  # small splits are still cut into 8 shards so ranks x loader workers all get some
MIN_SAMPLES_PER_SHARD = 256  # ... of at least this many samples (the default plan's floor)
# A typical node's shard readers: 8 GPUs x 4 loader workers. With fewer shards the training
# loader cuts shards between readers by sample range (every sample is still read once per
# epoch), and a reader passes over the part of a shard before its range: a seek in local
# files, bytes streamed through for http / pipe: shards without --cache-dir.
NODE_READERS = 32
SAMPLE_OVERHEAD = 2048  # tar headers of 3 members, padding and the .json sidecar


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m histodist.shard", description=__doc__.split("\n")[0]
    )
    add = p.add_argument
    add("--dataset", choices=list(sources.LAYOUTS), help="raw layout of --src")
    add("--src", metavar="PATH", help="raw dataset folder (for csv: the CSV file)")
    add("--out", metavar="DIR", help="output folder: shards, manifest.json, _info.json")
    add("--name", help="dataset name in the manifest (default: --out's folder name)")
    add("--verify", metavar="DIR", help="re-read every shard of DIR against its manifest")
    add(
        "--overwrite",
        action="store_true",
        help="write into an --out that holds files histodist.shard did not write: they are "
        "kept, except files named like the shards, manifest.json or _info.json it writes",
    )
    add("--val-fraction", type=fraction, metavar="F", help="made valid split share (default 0.1)")
    add("--test-fraction", type=fraction, metavar="F", help="made test split share (default 0.1)")
    add("--seed", type=int, default=0, help="seed of the made split and sample order (0)")
    add(
        "--samples-per-shard",
        type=integer(1),
        metavar="N",
        help="default ~256 MB, >= 8 shards/split",
    )
    add(
        "--encoding",
        choices=imageio.ENCODINGS,
        default="auto",
        help="auto: keep encoded images' bytes, lossless PNG for HDF5 pixel arrays",
    )
    add(
        "--jpeg-quality",
        type=integer(1, 100),
        default=95,
        metavar="Q",
        help="for --encoding jpeg (95)",
    )
    add(
        "--workers",
        type=integer(1),
        default=max(1, min(8, os.cpu_count() or 1)),
        metavar="N",
        help="processes writing shards (default: CPU count, at most 8)",
    )
    add("--magnification", metavar="M",
        help="breakhis: keep one of 40X/100X/200X/400X; wsi: tile at 10/M µm/px (20: 0.5)")  # fmt: skip
    add("--breakhis-labels", choices=["binary", "subtype"], default="binary", help="breakhis")
    add("--image-column", default="images", help="csv: image path column (images)")
    add("--label-column", default="labels", help="csv: label column (labels)")
    add("--group-column", help="csv: optional patient / slide id column")
    add_wsi_flags(add)
    add("--download", action="store_true", help="pcam: fetch the official release first")
    add("--cache-dir", metavar="DIR", help="pcam: downloads and gunzipped .h5 files")
    add(
        "--url-base",
        metavar="URL",
        help="pcam: download base (default: env HISTODIST_PCAM_URL, else the Zenodo record)",
    )
    return p


def add_wsi_flags(add) -> None:
    add("--mpp", type=positive, metavar="UM", help="wsi: tiles' µm per pixel (default 0.5)")
    add("--tile-size", type=integer(8), metavar="PX", help="wsi: tile side in pixels (default 224)")
    add("--min-tissue", type=fraction, metavar="F",
        help="wsi: keep tiles with at least this tissue fraction (default 0.5)")  # fmt: skip
    add("--assume-mpp", type=positive, metavar="UM",
        help="wsi: level-0 µm/px of slides whose file has none (else they stop the run)")  # fmt: skip
    add("--labels", metavar="CSV", help="wsi: slide,label[,patient][,split] per slide")
    add("--annotations", metavar="DIR", help="wsi: <slide>.geojson|.xml tumour regions")
    add("--label-coverage", type=positive, metavar="F",
        help="wsi: a tile is tumour from this annotated fraction of its area (default 0.5)")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    # A file the shard writer cannot read or write is the user's to fix: one line, exit 1.
    return run_cli("shard", _main, parser, args, argv, extra=(OSError,))


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    if args.verify:
        n = verify(args.verify)
        print(f"histodist.shard: {args.verify}: {n} shards verified")
        return 0
    if not args.dataset or not args.out or not (args.src or args.download):
        parser.error("--dataset, --out and --src (or --download) are required")
    if args.download:
        from histodist.ingest.download import fetch_pcam

        if args.dataset != "pcam":
            parser.error("--download is only available for --dataset pcam")
        args.src = str(fetch_pcam(args.cache_dir or args.src, args.url_base))
    manifest = run(args, argv)
    if manifest is None:  # a rank of a cluster run: another rank writes the manifest
        return 0
    _print_summary(manifest, args.out)
    warning = few_shards_warning(manifest)
    if warning:
        print(warning, file=sys.stderr)
    return 0


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict | None:
    """Scan, split, write every shard, then the manifest and _info.json (atomically, last).
    None: this rank of a cluster run wrote its shards, and another rank writes the manifest."""
    wsi = args.dataset == "wsi"
    rank = _rank() if wsi else ranks.Rank()
    opts = SourceOptions(
        None if wsi else _breakhis_magnification(args.magnification),
        args.breakhis_labels,
        args.image_column,
        args.label_column,
        args.group_column,
        args.cache_dir,
        wsi_options(args, rank) if wsi else _no_wsi_flags(args),
    )
    out = Path(args.out)
    found = outdir.claim(out, args.overwrite)  # refuses a folder of the user's files first
    scan = sources.scan(args.dataset, args.src, opts)
    splits = make_splits(scan, args.val_fraction, args.test_fraction, args.seed)
    out.mkdir(parents=True, exist_ok=True)
    if wsi:
        return _run_wsi(args, argv, scan, splits, rank, opts.wsi, found)
    outdir.start(found)  # an interrupted run must not look complete
    tasks = plan(scan, splits, out, args)
    return _finish(args, argv, scan, splits, tasks, write_all(tasks, args.workers), found)


def _run_wsi(
    args, argv, scan: Scan, splits: dict, rank: ranks.Rank, wsi: WsiOptions, found: outdir.OutDir
) -> dict | None:
    """The wsi layout's shards, this rank's share; the manifest when this rank is the one to
    write it (histodist.ingest.slides.claim), else None."""
    out = Path(args.out)
    args.encoding = "jpeg" if args.encoding == "auto" else args.encoding  # tiles: JPEG q95
    per_shard = {k: samples_per_shard(scan, v, args.samples_per_shard,
                                      sum(it.extra["tiles"] for it in v))
                 for k, v in splits.items()}  # fmt: skip
    tasks = sharding.plan(splits, out, scan.reader, scan.classes, encoding=args.encoding,
                          quality=args.jpeg_quality, per_shard=per_shard)  # fmt: skip
    tiling = wsi.record(args.magnification, scan.extra["labelled_by"])
    digest = claim.plan_digest(tasks, {"name": _name(args), "source": str(Path(args.src).resolve()),
                                       "seed": args.seed, "tiling": tiling,
                                       "version": version_string()})  # fmt: skip
    with claim.manifest_lock(out) as ledger:
        ledger.clear_stale(digest)
    records = sharding.gather(tasks, sharding.write_share(tasks, rank, args.workers), rank)
    who = f"rank {rank.rank} of {rank.world}"
    if records is None:
        print(f"histodist.shard: {who}: shards written; the last rank to finish writes the "
              "manifest (or re-run the command)")  # fmt: skip
        return None
    with claim.manifest_lock(out) as ledger:
        if rank.world > 1 and ledger.current(digest):  # another task was first to finish
            print(f"histodist.shard: {who}: shards written; the manifest is already written "
                  "(by another task or an earlier run)")  # fmt: skip
            return None
        manifest = _finish(args, argv, scan, splits, tasks, records, found, tiling)
        ledger.record(digest, claim.holder())
    if rank.world > 1:
        print(f"histodist.shard: {who}: every shard is finished: wrote the manifest")
    return manifest


def _finish(args, argv, scan: Scan, splits: dict, tasks: list[ShardTask], records: dict,
            found: outdir.OutDir, tiling: dict | None = None) -> dict:  # fmt: skip
    """Remove an earlier plan's shards (the writer's own, `found` at start: histodist.ingest.
    outdir), write _info.json and the manifest (atomically, last); `tiling`: the wsi layout's
    tiling record."""
    out = Path(args.out)
    reused = sum(r["reused"] for r in records.values())
    if reused:
        print(f"histodist.shard: {out}: {reused} of {len(records)} shards reused "
              "(complete and unchanged since they were written)")  # fmt: skip
    outdir.remove_stale(found, {t.name for t in tasks})
    name = _name(args)
    manifest = build_manifest(name, args, scan, splits, records, argv)
    if tiling is not None:
        manifest.update(sharding.manifest_slides(scan, splits, records))
        manifest["tiling"] = tiling
    _atomic_json(out / "_info.json", timm_info(name, manifest))
    _atomic_json(out / "manifest.json", manifest)
    return manifest


def _name(args: argparse.Namespace) -> str:
    return args.name or Path(args.out).resolve().name


def _rank() -> ranks.Rank:
    try:
        return ranks.from_env()
    except ValueError as e:
        raise UsageError(str(e)) from e


def _breakhis_magnification(value: str | None) -> str | None:
    if value is not None and value not in ("40X", "100X", "200X", "400X"):
        raise UsageError(f"--magnification {value}: breakhis has 40X, 100X, 200X or 400X")
    return value


def _no_wsi_flags(args: argparse.Namespace) -> None:
    for flag in ("mpp", "tile_size", "min_tissue", "assume_mpp", "labels", "annotations",
                 "label_coverage"):  # fmt: skip
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag.replace('_', '-')} is only for --dataset wsi")
    return None


def make_splits(scan: Scan, val: float | None, test: float | None, seed: int) -> dict:
    """Official splits, plus train/valid/test carved from `scan.pool`; groups never straddle."""
    splits = dict(scan.official)
    if scan.pool:
        fractions = {}
        for split, given in (("valid", val), ("test", test)):
            if split in splits and given:
                raise UsageError(
                    f"--{split.replace('valid', 'val')}-fraction: the source "
                    f"already has an official {split} split"
                )
            if split not in splits:
                fractions[split] = 0.1 if given is None else given
        if any(not 0 <= f < 1 for f in fractions.values()) or sum(fractions.values()) >= 1:
            raise UsageError(f"split fractions {fractions} must be in [0, 1) and sum below 1")
        carved = split_items(scan.pool, len(scan.classes), fractions, seed)
        splits = {**carved, **splits}
    elif val or test:
        raise UsageError("--val-fraction/--test-fraction: the source has official splits")
    if not scan.ordered:  # mix classes inside every shard (sources list files class by class)
        for i, name in enumerate(sorted(splits)):
            random.Random(seed * 1000 + i).shuffle(splits[name])
    check_groups(splits, set(scan.official))
    order = {"train": 0, "valid": 1, "test": 2}
    return dict(sorted(splits.items(), key=lambda kv: (order.get(kv[0], 3), kv[0])))


def check_groups(splits: dict[str, list[Item]], official: set[str]) -> None:
    """Fail when a patient / lesion / slide id is in two splits; only warn when both splits
    are the release's own (kept as published)."""
    seen: dict[str, str] = {}
    for split, items in splits.items():
        for g in sorted({it.group for it in items if it.group is not None}):
            first = seen.setdefault(g, split)
            if first == split:
                continue
            msg = f"group {g!r} is in both the {first} and {split} splits"
            if {first, split} <= official:
                print(
                    f"histodist.shard: warning: official splits share a group: {msg}",
                    file=sys.stderr,
                )
                continue
            raise ShardError(msg)


def shard_sizes(num_items: int, per_shard: int) -> list[int]:
    """Balanced shard sizes: as few shards as hold at most per_shard samples each, sizes
    differing by at most one (9,039 per shard over 262,144 samples: 30 shards of 8,738-8,739,
    not 29 of 9,039 and one of 13)."""
    k = math.ceil(num_items / per_shard)
    return [num_items // k + (i < num_items % k) for i in range(k)]


def samples_per_shard(
    scan: Scan, items: list[Item], requested: int | None, num_samples: int | None = None
) -> int:
    """At most this many samples per shard: --samples-per-shard, or ~SHARD_BYTES per shard
    but at least MIN_SHARDS per split (of `num_samples`, default one per item). `requested`
    is >= 1: the flag is checked as it is parsed."""
    if requested is not None:
        return requested
    if isinstance(scan.reader, FileReader) and items:
        probe = [Path(scan.reader.root) / it.source for it in items[:: max(1, len(items) // 200)]]
        sizes = [p.stat().st_size for p in probe if p.is_file()]  # unreadable ones: rejected later
        per_sample = sum(sizes) / max(1, len(sizes)) + SAMPLE_OVERHEAD
    else:
        per_sample = getattr(scan.reader, "bytes_per_sample", 96 * 96 * 3) + SAMPLE_OVERHEAD
    by_bytes = max(1, int(SHARD_BYTES // per_sample))
    n = len(items) if num_samples is None else num_samples
    return min(by_bytes, max(MIN_SAMPLES_PER_SHARD, math.ceil(n / MIN_SHARDS)))


def plan(scan: Scan, splits: dict, out: Path, args: argparse.Namespace) -> list[ShardTask]:
    """One ShardTask per shard; mean/std statistics come from train (or the first split)."""
    stats_split = "train" if "train" in splits else next(iter(splits))
    tasks = []
    for split, items in splits.items():
        start = 0
        for i, size in enumerate(
            shard_sizes(len(items), samples_per_shard(scan, items, args.samples_per_shard))
        ):
            tasks.append(
                ShardTask(
                    str(out),
                    f"{split}-{i:06d}.tar",
                    items[start : start + size],
                    scan.reader,
                    scan.classes,
                    args.encoding,
                    args.jpeg_quality,
                    stats=split == stats_split,
                )
            )
            start += size
    return tasks


def few_shards_warning(manifest: dict) -> str | None:
    """One line when splits have fewer shards than a node's NODE_READERS readers, with the
    --samples-per-shard that gives more; for slide tiles, none when no such value helps."""
    splits = manifest["splits"]
    few = [k for k, s in splits.items() if len(s["shards"]) < NODE_READERS]
    if not few:
        return None
    if manifest.get("slides") is not None:
        advice = _slide_shards_advice(manifest, few)
        if advice is None:
            return None
    else:
        n = splits[few[0]]["num_samples"]
        per_shard = max(1, n // NODE_READERS)
        advice = f"--samples-per-shard {per_shard} gives {few[0]} "
        advice += f"{len(shard_sizes(n, per_shard))} shards"
    listed = ", ".join(f"{k} {len(splits[k]['shards'])}" for k in few)
    return (
        f"histodist.shard: warning: shards per split: {listed}, fewer than {NODE_READERS} "
        "(8 GPUs x 4 loader workers), so readers share shards and pass over the part before "
        f"theirs; {advice}"
    )


def _slide_shards_advice(manifest: dict, few: list[str]) -> str | None:
    """The advice for tile shards, which hold whole slides where they fit: the largest
    --samples-per-shard of at least MIN_SAMPLES_PER_SHARD tiles that gives NODE_READERS
    shards (else the most shards such shards give) for the first split it gives more shards;
    None when it gives none more (a small slide set: its shards are small already)."""
    for split in few:
        sizes = sharding.slide_sizes(manifest, split)
        per_shard, count = sharding.per_shard_for(sizes, NODE_READERS, MIN_SAMPLES_PER_SHARD)
        if count > len(manifest["splits"][split]["shards"]):
            return (f"--samples-per-shard {per_shard} gives {split} {count} shards (whole "
                    "slides where they fit)")  # fmt: skip
    return None


def write_all(tasks: list[ShardTask], workers: int) -> dict[str, dict]:
    """Write shards, `workers` processes each writing whole shards; name -> record."""
    records: dict[str, dict] = {}
    size = {t.name: len(t.items) for t in tasks}
    pool = None
    if workers > 1 and len(tasks) > 1:  # started before tqdm's monitor thread exists
        pool = multiprocessing.Pool(min(workers, len(tasks)))
    try:
        done = pool.imap_unordered(write_shard, tasks) if pool else map(write_shard, tasks)
        with tqdm(total=sum(size.values()), unit="img", desc="shard", dynamic_ncols=True) as bar:
            for rec in done:
                _done(records, rec, bar, size)
    finally:
        if pool is not None:
            pool.terminate()  # all results are in (or an error is on its way): stop workers
            pool.join()
    return records


def _done(records: dict, rec: dict, bar: tqdm, size: dict) -> None:
    records[rec["name"]] = rec
    bar.update(size[rec["name"]])
    for r in [] if rec["reused"] else rec["rejected"]:
        tqdm.write(f"histodist.shard: warning: skipped {r['source']}: {r['reason']}", sys.stderr)


def build_manifest(name, args, scan, splits, records, argv) -> dict:
    """The manifest.json content (docs/shards.md) from the shard records."""
    recs = [records[k] for k in sorted(records)]
    split_m = {}
    for split, items in splits.items():
        mine = [r for r in recs if r["name"].startswith(f"{split}-")]
        labelled = any(it.label is not None for it in items)
        split_m[split] = {
            "num_samples": sum(r["num_samples"] for r in mine),
            "class_counts": [sum(c) for c in zip(*(r["class_counts"] for r in mine), strict=True)]
            if labelled
            else None,
            "num_groups": len({it.group for it in items if it.group is not None}),
            "shards": [{k: r[k] for k in ("name", "num_samples", "bytes", "sha256")} for r in mine],
        }
    sizes = {s for r in recs for s in r["sizes"]}
    image = None
    if len(sizes) == 1:
        h, w = map(int, next(iter(sizes)).split("x"))
        image = {"height": h, "width": w, "mode": "RGB"}
    mean, std = _mean_std([r for r in recs if r["pixels"]])
    return {
        "format": FORMAT,
        "dataset": name,
        "layout": args.dataset,
        "source": str(Path(args.src).resolve()),
        "classes": scan.classes,
        "task": "binary" if len(scan.classes) == 2 else "multiclass",
        "group_by": scan.group_by,
        "encoding": _encoding_name(args.encoding, scan),
        "image": image,
        "mean": mean,
        "std": std,
        "splits": split_m,
        "converted": {k: sum(r["converted"][k] for r in recs) for k in imageio.CONVERSIONS},
        "rejected": [
            {"source": x["source"], "reason": x["reason"]} for r in recs for x in r["rejected"]
        ],
        "seed": args.seed,
        "command": "python -m histodist.shard " + shlex.join(argv),
        "histodist_version": version_string(),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _encoding_name(encoding: str, scan: Scan) -> str:
    if encoding != "auto":
        return encoding
    return "original" if isinstance(scan.reader, FileReader) else "png"


def _mean_std(recs: list[dict]) -> tuple[list[float] | None, list[float] | None]:
    n = sum(r["pixels"] for r in recs)
    if not n:
        return None, None
    mean = [sum(r["sum"][c] for r in recs) / n for c in range(3)]
    var = [sum(r["sumsq"][c] for r in recs) / n - mean[c] ** 2 for c in range(3)]
    return [round(m, 6) for m in mean], [round(math.sqrt(max(v, 0.0)), 6) for v in var]


def timm_info(name: str, manifest: dict) -> dict:
    """timm's `_info.json`: wds/<name> readers take filenames and shard lengths from it."""
    splits = {}
    for split, s in manifest["splits"].items():
        splits[split] = {
            "name": split,
            "num_samples": s["num_samples"],
            "filenames": [sh["name"] for sh in s["shards"]],
            "shard_lengths": [sh["num_samples"] for sh in s["shards"]],
        }
    return {"name": name, "splits": splits}


def verify(folder: str | Path) -> int:
    """Re-read every shard of `folder` and compare with manifest.json; returns shards checked."""
    from histodist.data.loader import load_manifest  # torch: only for --verify

    folder = Path(folder)
    manifest = load_manifest(str(folder))  # checks the schema and every shard name first
    n = 0
    for split, s in manifest["splits"].items():
        for sh in s["shards"]:
            path = folder / sh["name"]
            if not path.is_file():
                raise ShardError(f"{path}: shard missing")
            if path.stat().st_size != sh.get("bytes") or file_digest(path) != sh.get("sha256"):
                raise ShardError(f"{path}: sha256 or size differs from the manifest")
            try:
                count = len(read_shard_keys(path))
            except Exception as e:  # tarfile raises several types for damaged archives
                raise ShardError(f"{path}: unreadable tar ({e})") from e
            if count != sh["num_samples"]:
                raise ShardError(f"{path}: {count} samples, manifest says {sh['num_samples']}")
            n += 1
        if sum(sh["num_samples"] for sh in s["shards"]) != s["num_samples"]:
            raise ShardError(f"{folder}: split {split} shard counts do not add up")
    return n


def _atomic_json(path: Path, obj: dict) -> None:
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def _print_summary(manifest: dict, out: str) -> None:
    for split, s in manifest["splits"].items():
        print(
            f"histodist.shard: {out}: {split}: {s['num_samples']} samples in "
            f"{len(s['shards'])} shards, class counts {s['class_counts']}"
        )
    if manifest["rejected"]:
        print(f"histodist.shard: {len(manifest['rejected'])} images rejected (see manifest.json)")


if __name__ == "__main__":
    sys.exit(main())
