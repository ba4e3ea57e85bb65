"""A MIL run applied to slide files: per-slide probabilities (predict) and tile heatmaps (explain).

    rows = predict_slides(run, "slides/", work, device="cuda")         # one row per slide
    path = explain_slide(run, "slides/a.svs", work, out="a.png")        # or a set's slide id

A MIL head was trained on the embeddings of one backbone, tiled at one µm/px and tile size:
the run folder keeps that embedding set's manifest (`embedding`: the backbone, its weights'
sha256, its preprocessing; `tiling`). Slide files are embedded here exactly as
`histodist.embed --slides` embeds them (histodist.inference.slide_set, into a work folder: a
re-run with the same folder reuses every finished slide), with the backbone built again and
checked against the recorded weights (histodist.inference.backbone), at the run's tiling; then
each slide's bag goes through the head. Heatmaps are drawn by histodist.inference.heatmap over
the slide's thumbnail, the most-attended tiles read again from the slide at the tiles' µm/px.
"""

from __future__ import annotations

import csv
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from histodist.data import bags
from histodist.errors import UsageError
from histodist.inference.core import InputError, Run, atomic_write, logits_to_probs

THUMB_SIDE = 1200  # px, the longest side of a heatmap's thumbnail
ATTENTION_HEADS = ("abmil", "clam-sb", "transmil")


@dataclass
class SlideInputs:
    """How slides are read and embedded for a run (predict's and explain's flags)."""

    device: str = "cpu"
    autocast: object = None  # a context manager factory, or None (fp32)
    precision: str = "no"
    batch_size: int = 64
    workers: int = 1
    assume_mpp: float | None = None
    progress: bool = True

    @classmethod
    def from_args(cls, args, device: str) -> SlideInputs:
        """From predict's / explain's flags (--precision resolved for `device` and printed)."""
        from histodist.inference.core import autocast_for

        amp, choice = autocast_for(args.precision, device)
        print(choice.describe(), file=sys.stderr)
        return cls(device, amp, choice.precision, args.batch_size, max(1, args.workers),
                   args.assume_mpp, not args.no_progress)  # fmt: skip


@contextmanager
def work_folder(path: str | None) -> Iterator[Path]:
    """`path` (kept: a re-run reuses its finished slides), else a temporary folder removed on
    exit."""
    if path:
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="histodist-slides-") as tmp:
        yield Path(tmp)


def check_run(run: Run, flag: str) -> dict:
    """The tiling a MIL run's embeddings were made at; raises UsageError for other runs."""
    if not run.is_bags:
        raise UsageError(f"{flag}: {run.run_dir} is a {run.cfg.model.model} run on images or "
                         "embedding vectors; slides need a MIL head (--model abmil, ...)")  # fmt: skip
    tiling = run.manifest.get("tiling")
    if not run.manifest.get("embedding") or not tiling:
        raise UsageError(f"{flag}: {run.run_dir}/manifest.json has no embedding and tiling "
                         "blocks: the run did not train on embedded slide tiles")  # fmt: skip
    return tiling


def embed_for_run(run: Run, src: str, work: Path, inputs: SlideInputs) -> dict:
    """Embed the slides under `src` (a folder or one file) into `work` as histodist.embed
    --slides does, with the run's backbone at the run's tiling; the set's manifest."""
    from histodist.inference import slide_set
    from histodist.inference.backbone import Backbone
    from histodist.ingest.slides.survey import TilingOptions
    from histodist.ingest.sources.wsi import WsiOptions

    t = check_run(run, "--slides")
    backbone = Backbone.rebuild(run.manifest["embedding"], where=str(run.run_dir))
    tiling = TilingOptions(float(t["mpp"]), int(t["tile_size"]), float(t["min_tissue"]),
                           inputs.assume_mpp, t.get("reader") or "openslide")  # fmt: skip
    wsi = WsiOptions(tiling, str(work), workers=inputs.workers)
    opts = slide_set.Options(batch_size=inputs.batch_size, progress=inputs.progress,
                             command="embedded for " + str(run.run_dir))  # fmt: skip
    folder = slide_set.find_slides(src, wsi, opts)
    return slide_set.embed_slides(folder, work, backbone, device=inputs.device,
                                  autocast=inputs.autocast, precision=inputs.precision,
                                  opts=opts)  # fmt: skip


@torch.no_grad()
def score(run: Run, bag: bags.Bag, device) -> tuple[np.ndarray, np.ndarray]:
    """(float64 (C,) slide probabilities, float64 (N,) tile scores) of one bag."""
    model = run.model.to(device).eval()
    out = model.bag(bag.features.to(device).float()[None])
    probs = logits_to_probs(out.logits)[0].double().cpu().numpy()
    return probs, out.scores[0].double().cpu().numpy()


def bag_of(shards: str, manifest: dict, sid: str) -> bags.Bag:
    """The bag of slide `sid` of an embedding set (every tile, with its JSON)."""
    e = manifest["slides"][sid]
    slide = next(s for s in bags.slides(manifest, e["split"], shards) if s.id == sid)
    return bags.read_bag(shards, slide)


# ----------------------------------------------------------------------------- predict
def predict_slides(run: Run, src: str, work: Path, inputs: SlideInputs) -> list[dict]:
    """One row per slide found under `src`: {slide, path, probs (C,) or None, tiles, error}."""
    manifest = embed_for_run(run, src, work, inputs)
    root = Path(manifest["source"])
    rows = []
    for sid, e in manifest["slides"].items():
        row = {"slide": sid, "path": str(root / e["path"]), "probs": None, "tiles": e["tiles"]}
        if e["tiles"] == 0 or e.get("split") is None:
            row["error"] = "no tissue found"
        else:
            row["probs"] = score(run, bag_of(str(work), manifest, sid), inputs.device)[0]
            row["error"] = ""
        rows.append(row)
    for r in manifest["rejected_slides"]:
        sid = Path(r["path"]).stem
        rows.append({"slide": sid, "path": str(root / r["path"]), "probs": None, "tiles": 0,
                     "error": r["reason"]})  # fmt: skip
    return sorted(rows, key=lambda r: r["path"])


def write_slide_csv(path: str | Path, rows: list[dict], classes: list[str]) -> Path:
    """CSV: slide, path, prob_<class>..., pred, tiles, error (empty probabilities and pred
    for a slide that could not be scored)."""
    from histodist.metrics import predicted_class

    def write(f):
        w = csv.writer(f)
        w.writerow(["slide", "path", *[f"prob_{c}" for c in classes], "pred", "tiles", "error"])
        for r in rows:
            p = r["probs"]
            if p is None:
                w.writerow(
                    [r["slide"], r["path"], *[""] * len(classes), "", r["tiles"], r["error"]]
                )
                continue
            pred = classes[int(predicted_class(p[None])[0])]
            w.writerow([r["slide"], r["path"], *[f"{v:.6f}" for v in p], pred, r["tiles"], ""])

    return atomic_write(path, write)


# ----------------------------------------------------------------------------- explain
def explain_slide(run: Run, spec: str, work: Path, inputs: SlideInputs, *, out: Path | None,
                  shards: str | None = None, src: str | None = None, top: int = 8) -> Path:  # fmt: skip
    """Draw the run's tile scores over one slide: `spec` a slide file (embedded into `work`)
    or the id of a slide of the embedding set `shards` (default: the run's); returns the PNG."""
    tiling = check_run(run, "--slide")
    if Path(spec).is_file():
        manifest = embed_for_run(run, spec, work, inputs)
        found = [sid for sid, e in manifest["slides"].items() if e["tiles"]]
        if not found:
            why = manifest["rejected_slides"][0]["reason"] if manifest["rejected_slides"] else (
                "no tissue found")  # fmt: skip
            raise InputError(f"{spec}: nothing to explain: {why}")
        sid, shards, path = found[0], str(work), Path(spec)
    else:
        shards = shards or run.cfg.data.shards
        manifest, sid = _set_slide(run, shards, spec)
        path = _slide_file(manifest, sid, src, shards)
    bag = bag_of(shards, manifest, sid)
    probs, scores = score(run, bag, inputs.device)
    out = out or run.run_dir / f"explain-{sid}.png"
    return draw(run, bag, path, tiling, out, probs=probs, scores=scores, top=top,
                assume_mpp=inputs.assume_mpp)  # fmt: skip


def _set_slide(run: Run, shards: str, sid: str) -> tuple[dict, str]:
    from histodist.data.embeddings import check_compatible
    from histodist.data.loader import load_manifest

    manifest = load_manifest(shards)
    check_compatible(run.manifest, manifest, shards)
    e = (manifest.get("slides") or {}).get(sid)
    if e is None or not e.get("tiles") or e.get("split") is None:
        have = [s for s, v in (manifest.get("slides") or {}).items() if v.get("tiles")]
        raise UsageError(f"--slide {sid}: neither a slide file nor a slide with tiles in "
                         f"{shards} (slides: {', '.join(have[:5])}{', ...' if len(have) > 5 else ''})")  # fmt: skip
    return manifest, sid


def _slide_file(manifest: dict, sid: str, src: str | None, shards: str) -> Path:
    """The file of slide `sid`: its path under `src`, else under the folder the set (or the
    tile shards it was embedded from) records."""
    rel = manifest["slides"][sid]["path"]
    roots = [src] if src else [manifest.get("source"), _tile_source(manifest)]
    for root in filter(None, roots):
        if (Path(root) / rel).is_file():
            return Path(root) / rel
    raise InputError(f"--slide {sid}: its file {rel} is not under "
                     f"{src or manifest.get('source') or 'the folder the set records'}; "
                     "give the slides' folder with --src DIR")  # fmt: skip


def _tile_source(manifest: dict) -> str | None:
    """The slide folder recorded by the tile shards an embedding set was made from."""
    from histodist.data.loader import load_manifest

    tiles = (manifest.get("embedding") or {}).get("source_shards")
    try:
        return load_manifest(tiles).get("source") if tiles else None
    except Exception:  # moved or remote tile shards: no folder to offer
        return None


def _title(run: Run, bag: bags.Bag, probs: np.ndarray, scores: np.ndarray) -> str:
    """Slide, probability (and label when known); run, head, tiles, the scores' range."""
    head, classes = run.cfg.model.model, run.classes
    k = 1 if len(classes) == 2 else int(np.argmax(probs))
    line = f"{bag.slide.id}: P({classes[k]}) = {probs[k]:.3f}"
    if bag.slide.label >= 0:
        line += f"  (label {classes[bag.slide.label]})"
    name = run.run_dir.name if run.run_dir.name == head else f"{run.run_dir.name} ({head})"
    what = "attention" if head in ATTENTION_HEADS else "tile scores"
    span = f"{what} {scores.min():.3g} to {scores.max():.3g}"
    if head in ATTENTION_HEADS:  # so that a near-uniform attention is not over-read
        span += f" (uniform: {1 / len(scores):.3g})"
    return f"{line}\n{name}, {len(scores)} tiles, {span}"


def draw(run: Run, bag: bags.Bag, path: Path, tiling: dict, out: Path, *, probs: np.ndarray,
         scores: np.ndarray, top: int = 8, assume_mpp: float | None = None) -> Path:  # fmt: skip
    """The heatmap PNG of one slide (histodist.inference.heatmap.save_heatmap)."""
    from histodist.inference.heatmap import save_heatmap
    from histodist.ingest.slides.reader import open_slide
    from histodist.ingest.slides.tiling import Tile, geometry, read_tile

    head, classes = run.cfg.model.model, run.classes
    title = _title(run, bag, probs, scores)
    attention = head in ATTENTION_HEADS
    label = "attention" if attention else f"tile P({classes[1] if len(classes) == 2 else 'pred'})"
    size = int(tiling["tile_size"])
    with open_slide(path, backend=tiling.get("reader") or "openslide",
                    assume_mpp=assume_mpp or tiling.get("assume_mpp")) as slide:  # fmt: skip
        g = geometry(slide, mpp=float(tiling["mpp"]), tile_size=size)
        coords = bag.coords()

        def tile_pixels(i: int) -> np.ndarray:
            x, y = coords[i]
            return read_tile(slide, Tile(int(x), int(y), g.level, g.read_size, g.extent, 0.0), size)

        return save_heatmap(out, slide.thumbnail(THUMB_SIDE), coords, bag.extents(), scores,
                            level0_size=slide.dimensions, read_tile=tile_pixels, top=top,
                            title=title, label=label, scale="rank" if attention else "none")  # fmt: skip
