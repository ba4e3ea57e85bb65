"""Embed a shard set or a folder of slides once with a frozen backbone; heads then train on the vectors.

    python -m histodist.embed --model hf-hub:MahmoodLab/UNI --shards shards/pcam --out emb/pcam-uni
    accelerate launch -m histodist.embed --model virchow2 --shards S --out E   # several GPUs/nodes
    python -m histodist.embed --model uni --slides slides/ --mpp 0.5 --tile-size 224 --out E

Every input shard becomes one output shard of the same name holding the same samples (float16
vectors, histodist.data.embeddings), so rank r embeds shards r::world (the evaluation loader's split:
every sample exactly once) and needs no gather. A shard is written under a temporary name and
renamed when complete (histodist.fileio); its record in `.shardinfo/` names the weights, the preprocessing and the input
shard's sha256, so a re-run skips every complete shard. The main process then writes the
manifest (model, weights sha256, hub revision, preprocessing, dimension, throughput).
Tiles of whole slides keep their slide id and position, and the manifest lists where each
slide's tiles are (`slides`, histodist.data.bags), so a MIL head reads a slide's bag directly.
`--slides` embeds whole slides straight from their files, tissue and tiles as the tiler finds
them, without writing image tiles (histodist.inference.slide_set: one shard per slide, ranks
share the slides, a re-run resumes per slide).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from histodist.data import bags, embeddings
from histodist.data import loader as data
from histodist.errors import UsageError, fraction, integer, positive, run_cli
from histodist.fileio import atomic_path, atomic_write, file_digest
from histodist.inference.backbone import build_record, describe, load_backbone
from histodist.ingest.writer import INFO_DIR, finished_record
from histodist.models import features
from histodist.version import version_string

WRITER_VERSION = 2  # bump when the bytes written for the same inputs change (2: tile fields)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="histodist.embed", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="hf-hub:ORG/NAME, local-dir:PATH, a known "
                   "pathology model (uni, virchow2, ...) or a timm name")  # fmt: skip
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="image shard folder or URL base")
    src.add_argument("--slides", help="a folder of whole-slide images (searched recursively) or "
                     "one slide file: tissue, tiles and vectors, no image tiles written")  # fmt: skip
    p.add_argument("--out", required=True, help="output folder of the embedding shards")
    p.add_argument("--split", nargs="+", help="splits to embed (default: all; --shards only)")
    p.add_argument("--family", default="auto", help="known model family (auto: by hub id or "
                   "recognised from a copy's config.json; none: config.json alone)")  # fmt: skip
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="load pretrained weights (default: yes for hub models, no for timm "
                   "names, which then embed with random weights seeded by --seed)")  # fmt: skip
    p.add_argument("--weights", help="local weights file loaded into the backbone")
    p.add_argument("--image-size", type=integer(0), default=0, help="input size (0: the model's)")
    p.add_argument("--interpolation", choices=("bilinear", "bicubic"),
                   help="resize filter (default: the model's pretrained config)")  # fmt: skip
    p.add_argument("--crop-pct", type=positive, help="resize to input size / this, then centre "
                   "crop the input size (default: the model's pretrained config)")  # fmt: skip
    p.add_argument("--crop-mode", choices=("center", "squash"), help="center: resize the shorter "
                   "side, keep the aspect; squash: both sides (default: the model's)")  # fmt: skip
    p.add_argument("--batch-size", type=integer(1), default=64, help="images per forward pass")
    p.add_argument("--workers", type=integer(0), default=1, help="decode workers per shard (0: "
                   "inline); --slides: processes surveying the slides")  # fmt: skip
    p.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"),
                   help="autocast of the forward pass")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of a randomly initialised model "
                   "(--slides: also of the split made, as histodist.shard's --seed)")  # fmt: skip
    _slide_flags(p.add_argument_group("--slides (as histodist.shard --dataset wsi)").add_argument)
    return p


def _slide_flags(add) -> None:
    from histodist.shard import add_wsi_flags

    add_wsi_flags(add)
    add("--magnification", metavar="M", help="wsi: tile at 10/M µm/px (20: 0.5) instead of --mpp")
    add("--val-fraction", type=fraction, metavar="F", help="valid split share of slides without a "
        "split column (default 0.1)")  # fmt: skip
    add("--test-fraction", type=fraction, metavar="F", help="test split share (default 0.1)")
    add("--name", help="dataset name in the manifest (default: the slide folder's name)")
    add("--prefetch", type=integer(1), default=4, metavar="N",
        help="batches of tiles read ahead (the next slide is read while one is embedded)")  # fmt: skip
    add("--read-threads", type=integer(1), default=2, metavar="N", help="threads reading a slide's "
        "regions (2; a GPU that embeds faster than ~250 tiles/s per thread wants more)")  # fmt: skip
    add("--no-progress", action="store_true", help="no progress bar")


SLIDE_ONLY = ("mpp", "tile_size", "min_tissue", "assume_mpp", "labels", "annotations",
              "label_coverage", "magnification", "val_fraction", "test_fraction", "name")  # fmt: skip


# ----------------------------------------------------------------------------- one shard
def fingerprint(identity: dict, shard: dict) -> str:
    blob = json.dumps(
        [WRITER_VERSION, identity, shard.get("sha256"), shard["name"]], sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@torch.no_grad()
def embed_shard(acc, model, transform, url: str, expected: int, out_path: Path, args) -> list:
    """Embed one input shard into `out_path` (temp name + rename); returns its slide runs
    (embeddings.ShardWriter.runs; empty for shards of ordinary patches)."""
    loader = data.from_urls([url], batch_size=args.batch_size, rank=0, world_size=1,
                            num_samples=expected, train=False, workers=args.workers,
                            image_size=args.load_size)  # fmt: skip
    with atomic_path(out_path) as tmp:  # no partial shard left on error
        with (
            open(tmp, "wb") as f,
            tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar,
        ):
            out = embeddings.ShardWriter(tar, args.num_classes)
            for batch in loader:
                x = transform(batch["image"].to(acc.device, non_blocking=True))
                with acc.autocast():
                    feats = features(model, x, args.model).float().cpu().numpy()
                for key, label, meta, vec in zip(batch["key"], batch["label"].tolist(),
                                                 batch["meta"], feats, strict=True):  # fmt: skip
                    out.add(key, vec, label, embeddings.tile_meta(meta))
        if out.count != expected:
            raise data.ShardError(f"{url}: embedded {out.count} samples, manifest says {expected}")
    return out.runs


def _write_record(out: Path, name: str, rec: dict) -> None:
    atomic_write(out / INFO_DIR / f"{name}.json", json.dumps(rec))


# ----------------------------------------------------------------------------- the set
def embed_split(acc, model, transform, manifest: dict, split: str, identity: dict, args) -> dict:
    """Embed this rank's shards (r::world) of `split`; complete shards are skipped.
    Returns {"embedded": n, "reused": n} samples and the "seconds" spent embedding."""
    out, counts = Path(args.out), {"embedded": 0, "reused": 0, "seconds": 0.0}
    entries = manifest["splits"][split]["shards"]
    for e in data.split_by_rank(entries, acc.process_index, acc.num_processes):
        fp = fingerprint(identity, e)
        if finished_record(out, e["name"], fp) is not None:
            counts["reused"] += int(e["num_samples"])
            continue
        url, n = data.join_url(args.shards, e["name"]), int(e["num_samples"])
        t0 = time.perf_counter()
        runs = embed_shard(acc, model, transform, url, n, out / e["name"], args)
        counts["seconds"] += time.perf_counter() - t0
        path = out / e["name"]
        rec = {"name": e["name"], "num_samples": n, "bytes": path.stat().st_size,
               "sha256": file_digest(path), "fingerprint": fp, "slides": runs}  # fmt: skip
        _write_record(out, e["name"], rec)
        counts["embedded"] += n
    return counts


def build_manifest(src: dict, splits: list[str], identity: dict, args, throughput=None) -> dict:
    """The embedding set's manifest.json from the input manifest and the shard records
    (`throughput`: this run's figures, see measure)."""
    out, split_m, records = Path(args.out), {}, {}
    for split in splits:
        s = src["splits"][split]
        recs = []
        for e in s["shards"]:
            rec = finished_record(out, e["name"], fingerprint(identity, e))
            if rec is None:
                raise data.ShardError(f"{out / e['name']}: missing or incomplete; re-run embed")
            recs.append({k: rec[k] for k in ("name", "num_samples", "bytes", "sha256")})
            records.setdefault(split, []).append(rec)
        split_m[split] = {**{k: v for k, v in s.items() if k != "shards"}, "shards": recs}
    slides = bags.slide_index(records, src.get("slides") or {}, len(src["classes"]))
    blob = json.dumps(src, sort_keys=True).encode()
    # the tiler's settings (µm/px, tile size) go with the slide index: heatmaps need them
    extra = {}
    if slides:
        extra = {"slides": slides, "rejected_slides": src.get("rejected_slides", []),
                 "tiling": src.get("tiling")}  # fmt: skip
    if slides and src.get("source"):  # the slide folder, where explain finds a slide's file
        extra["source"] = src["source"]
    return {
        "format": src["format"],
        "kind": embeddings.KIND,
        "dataset": src.get("dataset"),
        "classes": src["classes"],
        "task": src.get("task"),
        "group_by": src.get("group_by"),
        "encoding": "float16-npy",
        "image": None,
        "embedding": {
            **identity,
            "build": build_record(args),  # how predict --slides builds this backbone again
            "dtype": "float16",
            "member": embeddings.MEMBER,
            "source_shards": args.shards,
            "source_manifest_sha256": hashlib.sha256(blob).hexdigest(),
        },  # fmt: skip
        "splits": split_m,
        **extra,
        "throughput": throughput,
        "command": "python -m histodist.embed " + " ".join(sys.argv[1:]),
        "histodist_version": version_string(),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def previous_splits(out: Path, identity: dict) -> list[str]:
    """Splits an earlier run of the same weights and preprocessing wrote to `out` (so that
    `--split valid` then `--split train` leave a manifest listing both)."""
    try:
        prev = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return []
    emb = prev.get("embedding") or {}
    same = all(emb.get(k) == identity[k] for k in ("weights_sha256", "preprocessing", "dim"))
    return list(prev.get("splits", {})) if same else []


def run(args) -> int:
    from accelerate import Accelerator

    from histodist.augment import pretrained_transform

    if args.slides:
        return run_slides(args)
    for flag in SLIDE_ONLY:
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag.replace('_', '-')} is for --slides (tile shards are tiled)")
    acc = Accelerator(mixed_precision=args.precision)
    manifest = data.load_manifest(args.shards)
    splits = args.split or list(manifest["splits"])
    for s in splits:
        data.split_shards(manifest, s, args.shards)  # a missing split fails before any work
    model = load_backbone(args)
    identity = describe(model, args)
    pre = identity["preprocessing"]
    model.to(acc.device)
    size = pre["input_size"]
    args.load_size = None if manifest.get("image") else (size, size)
    transform = pretrained_transform(**pre)
    out = Path(args.out)
    (out / INFO_DIR).mkdir(parents=True, exist_ok=True)
    args.num_classes = len(manifest["classes"])
    total = {"embedded": 0, "reused": 0, "seconds": 0.0}
    for split in splits:
        for k, v in embed_split(acc, model, transform, manifest, split, identity, args).items():
            total[k] += v
    dt = total["seconds"]
    print(f"rank {acc.process_index}: embedded {total['embedded']} samples "
          f"({total['embedded'] / max(dt, 1e-9):.1f} img/s), {total['reused']} reused")  # fmt: skip
    speed = measure(acc, total)
    acc.wait_for_everyone()
    if acc.is_main_process:
        kept = [s for s in previous_splits(out, identity) if s not in splits]
        m = build_manifest(manifest, splits + kept, identity, args, speed)
        atomic_write(out / "manifest.json", json.dumps(m, indent=1))
        if speed["tiles_per_s"] is not None:
            print(f"embedded {speed['tiles']} tiles in {speed['seconds']:.1f} s on "
                  f"{speed['processes']} process(es): {speed['tiles_per_s']:.1f} tiles/s")  # fmt: skip
        print(f"{out}/manifest.json: {identity['dim']}-d float16 embeddings of {args.model}")
    return 0


def run_slides(args) -> int:
    """`--slides`: the slides under args.slides -> an embedding set (slide_set.embed_slides)."""
    from accelerate import Accelerator

    from histodist.inference import slide_set
    from histodist.inference.backbone import Backbone
    from histodist.ingest.slides import ranks
    from histodist.ingest.sources.wsi import wsi_options

    if args.split:
        raise UsageError("--split is for --shards; --slides embeds every slide, split as the "
                         "labels say (or in one unlabelled split, test)")  # fmt: skip
    try:
        rank = ranks.from_env()
    except ValueError as e:
        raise UsageError(str(e)) from e
    wsi = wsi_options(args, rank)  # bad values: one line before anything is read
    opts = slide_set.Options(
        batch_size=args.batch_size, prefetch=args.prefetch, read_threads=args.read_threads,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, seed=args.seed, magnification=args.magnification,
        name=args.name, command="python -m histodist.embed " + " ".join(sys.argv[1:]),
        progress=not args.no_progress,
    )  # fmt: skip
    folder = slide_set.find_slides(args.slides, wsi, opts)  # a slide without µm/px: exit 2 now
    acc = Accelerator(mixed_precision=args.precision)
    bb = Backbone.build(args)
    amp = acc.autocast if args.precision != "no" else None
    m = slide_set.embed_slides(folder, Path(args.out), bb, device=acc.device, autocast=amp,
                               precision=args.precision, rank=rank, opts=opts)  # fmt: skip
    if m is not None:
        t, n = m["throughput"], sum(e["tiles"] for e in m["slides"].values())
        if t["tiles_per_s"] is not None:
            print(f"embedded {t['tiles']} tiles in {t['seconds']:.1f} s on {t['processes']} "
                  f"process(es): {t['tiles_per_s']:.1f} tiles/s")  # fmt: skip
        print(f"{args.out}/manifest.json: {len(m['slides'])} slides, {n} tiles, "
              f"{bb.identity['dim']}-d float16 embeddings of {args.model}")  # fmt: skip
    return 0


def measure(acc, total: dict) -> dict:
    """This run's throughput over every rank (collective), the figure the manifest records:
    the samples embedded (not reused) per second of the slowest rank's embedding time
    (reading, decoding, the forward pass and writing its shards)."""
    t = torch.tensor([[total["embedded"], total["reused"], total["seconds"]]],
                     dtype=torch.float64, device=acc.device)  # fmt: skip
    rows = (acc.gather(t) if acc.num_processes > 1 else t).tolist()
    tiles, wall = int(sum(r[0] for r in rows)), max(r[2] for r in rows)
    return {"tiles": tiles, "reused": int(sum(r[1] for r in rows)), "seconds": round(wall, 3),
            "processes": acc.num_processes, "device": str(acc.device),
            "precision": acc.mixed_precision,
            "tiles_per_s": round(tiles / wall, 2) if tiles and wall > 0 else None}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return run_cli("embed", run, build_parser().parse_args(argv), extra=(FileNotFoundError,))


if __name__ == "__main__":
    sys.exit(main())
