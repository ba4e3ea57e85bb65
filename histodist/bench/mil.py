"""`python -m histodist.bench mil`: MIL heads on synthetic slide bags, where the answer is known.

Two figures, each through the real `histodist.train` loop on embedding shards in the format
`histodist.embed` writes (the per-slide index included):
  planted: bags of D-dim N(0, I) tile vectors; a positive bag holds a few tiles drawn from
      N(shift x u, I) (u: a fixed unit vector), a negative bag none. Per head: the slide AUC
      on held-out bags (histodist.metrics) and the attention precision: over the held-out
      positive bags, the fraction of its k planted tiles among the k highest-scored tiles
      (the head's attention, or its tile scores for mean / max pooling).
  epoch: training seconds per epoch of one head over S slides of N tiles (validation and
      the first epoch, which pays the start-up, excluded), from metrics.jsonl's clock.
Figures, not tests: they depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from histodist.bench.common import machine_info, table, write_json
from histodist.data import bags, embeddings
from histodist.fileio import atomic_path, file_digest

TILE = 224  # level-0 side of a synthetic tile


@dataclass
class SyntheticSlide:
    """A slide's bag: float32 (N, D) tile vectors, its label, the indices of planted tiles."""

    id: str
    features: np.ndarray
    label: int
    patient: str | None = None
    planted: list[int] = field(default_factory=list)


def planted_slides(n: int, *, dim: int, tiles: tuple[int, int], planted: tuple[int, int],
                   shift: float, seed: int, prefix: str = "slide") -> list[SyntheticSlide]:  # fmt: skip
    """n slides, half positive: N ~ U[tiles] tiles of N(0, I); a positive slide's k ~
    U[planted] tiles at random positions are N(shift x u, I) with u a unit vector fixed by
    nothing but the dimension (the same signal in every set)."""
    u = np.random.default_rng(12345).standard_normal(dim)
    u /= np.linalg.norm(u)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = i % 2
        x = rng.standard_normal((int(rng.integers(tiles[0], tiles[1] + 1)), dim))
        where: list[int] = []
        if label:
            k = int(rng.integers(planted[0], planted[1] + 1))
            where = sorted(rng.choice(len(x), k, replace=False).tolist())
            x[where] += shift * u
        out.append(SyntheticSlide(f"{prefix}{i:04d}", x.astype(np.float32), label,
                                  f"patient-{prefix}{i // 2:04d}", where))  # fmt: skip
    return out


def _tile_meta(s: SyntheticSlide, i: int) -> dict:
    cols = max(1, int(np.ceil(np.sqrt(len(s.features)))))
    return {"group": s.patient or s.id, "slide": s.id, "x": (i % cols) * TILE,
            "y": (i // cols) * TILE, "level": 0, "mpp": 0.5, "tissue": 1.0, "extent": TILE}  # fmt: skip


def _write_split(out: Path, split: str, slides: list[SyntheticSlide], per_shard: int) -> tuple:
    """Shards of `per_shard` tiles (slides cut across shards where they fall); returns the
    split's manifest entry and its shard records."""
    rows = [(s, i) for s in slides for i in range(len(s.features))]
    entries, records = [], []
    for j, lo in enumerate(range(0, len(rows), per_shard)):
        name = f"{split}-{j:06d}.tar"
        with atomic_path(out / name) as tmp, open(tmp, "wb") as f, \
                tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:  # fmt: skip
            w = embeddings.ShardWriter(tar, 2)
            for s, i in rows[lo : lo + per_shard]:
                w.add(f"{s.id}_x{i}", s.features[i], s.label, _tile_meta(s, i))
        entry = {"name": name, "num_samples": w.count, "bytes": (out / name).stat().st_size,
                 "sha256": file_digest(out / name)}  # fmt: skip
        entries.append(entry)
        records.append({**entry, "slides": w.runs})
    counts = [sum(len(s.features) for s in slides if s.label == c) for c in (0, 1)]
    return {"num_samples": len(rows), "class_counts": counts, "shards": entries}, records


def write_bag_set(out: str | Path, splits: dict[str, list[SyntheticSlide]], *,
                  per_shard: int = 4096) -> dict:  # fmt: skip
    """An embedding set of these slides, as histodist.embed writes one over tile shards
    (float16 vectors, tile JSON, the per-slide index); returns its manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    split_m, records = {}, {}
    for split, slides in splits.items():
        split_m[split], records[split] = _write_split(out, split, slides, per_shard)
    src = {s.id: {"label": s.label, "patient": s.patient} for ss in splits.values() for s in ss}
    dim = next(iter(splits.values()))[0].features.shape[1]
    manifest = {
        "format": "histodist-shards/1", "kind": embeddings.KIND, "dataset": "synthetic-bags",
        "classes": ["0", "1"], "task": "binary", "group_by": "patient", "encoding": "float16-npy",
        "image": None, "splits": split_m, "slides": bags.slide_index(records, src, 2),
        "embedding": {"model": "synthetic", "weights_sha256": "synthetic", "dim": int(dim),
                      "preprocessing": {"input_size": 0}, "dtype": "float16",
                      "member": embeddings.MEMBER},
    }  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


# ----------------------------------------------------------------------------- measuring
def train_head(shards: Path, runs: Path, head: str, flags: list[str]) -> Path:
    """Train `head` on the set with histodist.train (in this process); its run folder."""
    from histodist import train

    args = ["--shards", str(shards), "--model", head, "--runs-dir", str(runs),
            "--run-name", head, "--wandb", "disabled", "--no-progress", *flags]  # fmt: skip
    if train.main(args) != 0:
        raise RuntimeError(f"histodist.train {' '.join(args)} failed")
    return runs / head


@torch.no_grad()
def score_head(run_dir: Path, shards: Path, split: str, truth: dict[str, list[int]]) -> dict:
    """Slide AUC and attention precision of a trained run on `split` (its best checkpoint)."""
    from histodist import metrics
    from histodist.training.checkpoint import load_run_model

    model, _, _ = load_run_model(run_dir, "best")
    manifest = json.loads((shards / "manifest.json").read_text())
    probs, labels, hits = [], [], []
    for s in bags.slides(manifest, split):
        out = model.bag(bags.read_bag(str(shards), s).features.float().unsqueeze(0))
        probs.append(out.logits.float().softmax(-1)[0])
        labels.append(s.label)
        if truth.get(s.id):
            k = len(truth[s.id])
            top = out.scores[0].topk(k).indices.tolist()
            hits.append(len(set(top) & set(truth[s.id])) / k)
    auc = metrics.summary(torch.stack(probs), torch.tensor(labels))["auc"]
    return {"auc": round(auc, 4), "attention_precision": round(float(np.mean(hits)), 4)}


def epoch_seconds(run_dir: Path) -> list[float]:
    """Training seconds of each epoch after the first, from metrics.jsonl (validation out)."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [x for x in lines if "val/time_s" in x]
    return [
        round(b["time"] - b["val/time_s"] - a["time"], 3)
        for a, b in zip(val[:-1], val[1:], strict=True)
    ]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m histodist.bench mil", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    a = p.add_argument
    a("--suite", choices=("planted", "epoch", "all"), default="all")
    a("--heads", default="abmil,mean,max,clam-sb,transmil", help="planted: heads to compare")
    a("--dim", type=int, default=32, help="planted: embedding width")
    a("--train-slides", type=int, default=160, help="planted: training slides")
    a("--valid-slides", type=int, default=120, help="planted: held-out slides")
    a("--tiles", default="40-80", help="planted: tiles per slide, lo-hi")
    a("--planted", default="1-2,8-16",
      help="planted: planted tiles per positive slide, lo-hi; a comma list compares several")  # fmt: skip
    a("--shift", type=float, default=5.0, help="planted: distance of the planted tiles")
    a("--epochs", type=int, default=10, help="planted: training epochs")
    a("--lr", type=float, default=1e-3, help="planted: peak learning rate")
    a("--mil-dim", type=int, default=64, help="planted: --mil-dim of the heads")
    a("--epoch-head", default="abmil", help="epoch: head")
    a("--epoch-slides", type=int, default=100, help="epoch: slides")
    a("--epoch-tiles", default="500-2000", help="epoch: tiles per slide, lo-hi")
    a("--epoch-dim", type=int, default=1024, help="epoch: embedding width (UNI's)")
    a("--epoch-mil-dim", type=int, default=512, help="epoch: --mil-dim of the head")
    a("--seed", type=int, default=0)
    a("--json", help="write the report here")
    return p.parse_args(argv)


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    return int(lo), int(hi or lo)


def planted(args, tmp: Path, witnesses: str) -> dict:
    """Every head on one planted set (`witnesses`: planted tiles per positive slide, lo-hi)."""
    kw = dict(dim=args.dim, tiles=_range(args.tiles), planted=_range(witnesses),
              shift=args.shift)  # fmt: skip
    train = planted_slides(args.train_slides, seed=args.seed, prefix="t", **kw)
    valid = planted_slides(args.valid_slides, seed=args.seed + 1, prefix="v", **kw)
    shards, runs = tmp / f"bags-{witnesses}", tmp / f"runs-{witnesses}"
    write_bag_set(shards, {"train": train, "valid": valid})
    truth = {s.id: s.planted for s in valid}
    flags = ["--epochs", str(args.epochs), "--mil-dim", str(args.mil_dim), "--workers", "0",
             "--lr", str(args.lr), "--warmup-epochs", "0.5", "--seed", str(args.seed),
             "--precision", "no", "--log-every", "50"]  # fmt: skip
    out = {"data": kw | {"train_slides": len(train), "valid_slides": len(valid)}, "heads": {}}
    for head in args.heads.split(","):
        run = train_head(shards, runs, head, flags)
        out["heads"][head] = score_head(run, shards, "valid", truth)
    return out


def read_seconds(shards: Path, split: str = "train") -> dict:
    """Median seconds of 3 reads of the largest bag of `split`: through the index's byte
    range (the training path), and sample by sample from the shard's start (a stream that
    cannot seek)."""
    import dataclasses
    import statistics
    import time

    manifest = json.loads((shards / "manifest.json").read_text())
    big = max(bags.slides(manifest, split), key=lambda s: s.tiles)
    streamed = dataclasses.replace(big, parts=tuple(dataclasses.replace(p, offset=None, bytes=None)
                                                    for p in big.parts))  # fmt: skip
    out = {"tiles": big.tiles}
    for name, slide in (("byte_range_s", big), ("stream_s", streamed)):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            bags.read_bag(str(shards), slide, tiles=False)
            times.append(time.perf_counter() - t0)
        out[name] = round(statistics.median(times), 4)
    return out


def epoch(args, tmp: Path) -> dict:
    tiles = _range(args.epoch_tiles)
    slides = planted_slides(args.epoch_slides, dim=args.epoch_dim, tiles=tiles, planted=(1, 3),
                            shift=4.0, seed=args.seed, prefix="e")  # fmt: skip
    small = planted_slides(4, dim=args.epoch_dim, tiles=(8, 8), planted=(1, 1), shift=4.0,
                           seed=args.seed + 1, prefix="w")  # fmt: skip
    write_bag_set(tmp / "epoch", {"train": slides, "valid": small})
    flags = ["--epochs", "3", "--mil-dim", str(args.epoch_mil_dim), "--workers", "1",
             "--lr", "2e-4", "--log-every", "50"]  # fmt: skip
    read = read_seconds(tmp / "epoch")
    run = train_head(tmp / "epoch", tmp / "runs", args.epoch_head, flags)
    secs = epoch_seconds(run)
    n_tiles = sum(len(s.features) for s in slides)
    return {"head": args.epoch_head, "slides": len(slides), "tiles": n_tiles,
            "tiles_per_slide": list(tiles), "dim": args.epoch_dim, "mil_dim": args.epoch_mil_dim,
            "epoch_seconds": secs, "tiles_per_s": round(n_tiles / min(secs), 1),
            "bag_read": read}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    report: dict = {"machine": machine_info()}
    with tempfile.TemporaryDirectory(prefix="histodist-bench-mil-") as tmp:
        if args.suite in ("planted", "all"):
            report["planted"] = [planted(args, Path(tmp), w) for w in args.planted.split(",")]
            rows = [{"planted": "-".join(map(str, r["data"]["planted"])), "head": h, **v}
                    for r in report["planted"] for h, v in r["heads"].items()]  # fmt: skip
            cols = ["planted", "head", "auc", "attention_precision"]
            heads = ["planted tiles", "head", "held-out slide AUC", "attention precision"]
            print(table(rows, cols, heads))
        if args.suite in ("epoch", "all"):
            report["epoch"] = e = epoch(args, Path(tmp))
            r = e["bag_read"]
            print(f"{e['head']}: {e['slides']} slides of {e['tiles_per_slide']} tiles, "
                  f"{e['dim']}-d: {e['epoch_seconds']} s per epoch ({e['tiles_per_s']} tiles/s); "
                  f"a {r['tiles']}-tile bag reads in {r['byte_range_s']} s by its byte range, "
                  f"{r['stream_s']} s streamed")  # fmt: skip
    if args.json:
        write_json(args.json, report)
    return 0
