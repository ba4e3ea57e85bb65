"""`wsi`: a folder of whole-slide images (or one slide) -> tiles at exact µm/px.

    python -m histodist.shard --dataset wsi --src SLIDES --mpp 0.5 --tile-size 224 --out DIR
        [--labels slides.csv] [--annotations DIR] [--assume-mpp M]

Items are slides (one per slide with tissue; `extra` holds its tile count), so splits are made
per slide, at the patient level when the labels give patients; the shard planner
(histodist.ingest.slides.sharding) cuts them into segments and `WsiReader` expands a segment
into its tiles. Labels:
- none: every slide in one unlabelled split, `test` (what `predict` reads by default);
- `--labels slides.csv`: columns `slide` (file name, stem, or path relative to --src),
  `label`, and optionally `patient` and `split` (train / valid / test: kept as official);
  every tile takes its slide's label;
- `--annotations DIR`: `<slide stem>.geojson|.json|.xml` region files (slides.annotations);
  classes `normal`, `tumor`: a tile is `tumor` when at least `--label-coverage` of its area is
  annotated tumour; a slide without a file has only normal tiles. With `--labels` as well,
  the CSV gives patients, splits and the slide labels (normal / tumor).
Before any file is written every slide is opened: one without µm/px stops the run (exit 2)
unless `--assume-mpp` is given; one that cannot be opened is rejected with its reason.
"""

from __future__ import annotations

import csv
import functools
import multiprocessing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from histodist.errors import UsageError, warn
from histodist.ingest.slides import annotations as ann
from histodist.ingest.slides.reader import SlideError, open_slide, slide_files
from histodist.ingest.slides.survey import SlideJob, TilingOptions, load_tiles, survey
from histodist.ingest.slides.tiling import READ_AHEAD, READ_THREADS, Tile, geometry, read_tiles
from histodist.ingest.sources import (
    Item,
    Payload,
    Reader,
    Scan,
    SourceError,
    SourceOptions,
    clean_key,
    sort_classes,
    stat_signature,
    unique_keys,
)

ANNOTATION_CLASSES = ["normal", "tumor"]
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class WsiOptions:
    """The wsi layout's options (flags of histodist.shard)."""

    tiling: TilingOptions
    out: str  # survey cache and QC pictures go here
    labels: str | None = None
    annotations: str | None = None
    label_coverage: float = 0.5
    workers: int = 1
    rank: int = 0
    world: int = 1

    def record(self, magnification: str | None, labelled_by: str | None) -> dict:
        """The manifest's `tiling` block."""
        from histodist.ingest.slides import tissue
        from histodist.ingest.slides.tiling import MAX_UPSAMPLE

        t = self.tiling
        return {
            "mpp": t.mpp,
            "magnification": _magnification(magnification) if magnification else None,
            "tile_size": t.tile_size,
            "min_tissue": t.min_tissue,
            "label_coverage": self.label_coverage if self.annotations else None,
            "labels": labelled_by,
            "reader": t.backend,
            "assume_mpp": t.assume_mpp,
            "max_upsample": MAX_UPSAMPLE,
            "tissue": {"method": "otsu-saturation", "thumbnail_mpp": tissue.THUMB_MPP,
                       "threshold_range": [tissue.SAT_MIN, tissue.SAT_MAX]},
        }  # fmt: skip


def wsi_options(args, rank) -> WsiOptions:
    """The wsi options from histodist.shard's (or embed's) parsed flags: single values are
    checked as they are parsed (shard.add_wsi_flags); this raises UsageError for the
    combinations."""
    if args.mpp is not None and args.magnification is not None:
        raise UsageError("--mpp and --magnification: give one (--magnification M is 10/M µm/px)")
    mpp = 0.5 if args.mpp is None else args.mpp
    if args.magnification:
        mpp = 10.0 / _magnification(args.magnification)
    tile = 224 if args.tile_size is None else args.tile_size
    min_tissue = 0.5 if args.min_tissue is None else args.min_tissue
    coverage = 0.5 if args.label_coverage is None else args.label_coverage
    if coverage > 1:
        raise UsageError("--label-coverage must be in (0, 1]")
    if args.label_coverage is not None and not args.annotations:
        raise UsageError("--label-coverage needs --annotations")
    tiling = TilingOptions(mpp, tile, min_tissue, args.assume_mpp)
    return WsiOptions(tiling, args.out, args.labels, args.annotations, coverage, args.workers,
                      rank.rank, rank.world)  # fmt: skip


def _magnification(text: str) -> float:
    try:
        m = float(text.lower().removesuffix("x"))
    except ValueError:
        m = float("nan")
    if not 0 < m < float("inf"):
        raise UsageError(f"--magnification {text}: expected a number such as 20 or 40x")
    return m


@dataclass(frozen=True)
class Label:
    """A slide's row of the labels CSV."""

    label: str | None
    patient: str | None
    split: str | None


def scan(src: Path, opts: SourceOptions) -> Scan:
    w: WsiOptions = opts.wsi
    files = slide_files(src)
    if not files:
        raise SourceError(f"{src}: no slide files (.svs, .tif, .ndpi, .mrxs, ...) found")
    root = src if src.is_dir() else src.parent
    rels = [p.relative_to(root).as_posix() for p in files]
    ids = dict(zip(unique_keys(rels), rels, strict=True))  # slide id -> path relative to root
    labels = read_labels(Path(w.labels), ids) if w.labels else None
    notes = find_annotations(Path(w.annotations), ids) if w.annotations else {}
    regions = {sid: ann.load(p) for sid, p in notes.items()}  # bad polygons: exit 2 now
    rejected = check_slides(root, ids, w.tiling)
    jobs = [SlideJob(sid, str(root), rel, notes.get(sid)) for sid, rel in ids.items()
            if rel not in rejected]  # fmt: skip
    records = survey_all(jobs, w)
    for rec in records:
        if rec.get("error"):
            rejected[rec["path"]] = rec["error"]
        elif rec["tiles"] == 0:
            warn(f"{rec['path']}: no tissue found, no tiles")
    for path, reason in rejected.items():
        warn(f"rejected slide {path}: {reason}")
    good = [r for r in records if not r.get("error") and r["tiles"] > 0]
    if not good:
        raise SourceError(f"{src}: no tiles: every slide was rejected or has no tissue (above)")
    classes, items = slide_items(good, labels, regions if w.annotations else None)
    reader = WsiReader(str(root), w.out, w.tiling, w.label_coverage if w.annotations else None)
    scan = _splits(classes, items, labels, reader)
    scan.extra = {"surveys": records, "rejected_slides": rejected, "labelled_by":
                  "annotations" if w.annotations else "slides" if w.labels else None}  # fmt: skip
    return scan


def _splits(classes: list[str], items: list[Item], labels, reader: Reader) -> Scan:
    group_by = "patient" if any(it.extra.get("patient") for it in items) else "slide"
    if not classes:
        return Scan([], group_by, {"test": items}, [], reader, ordered=True)
    official = {s: [it for it in items if it.extra.get("split") == s] for s in SPLITS}
    official = {s: v for s, v in official.items() if v}
    pool = [it for it in items if not it.extra.get("split")]
    if official and pool:
        raise SourceError(f"{labels_path(labels)}: the split column is empty for some slides "
                          f"(e.g. {pool[0].source}); fill it for all or none")  # fmt: skip
    return Scan(classes, group_by, official, pool, reader, ordered=True)


def labels_path(labels) -> str:
    return getattr(labels, "path", "the labels CSV")


class LabelTable(dict):
    """slide id -> Label, remembering the CSV's path for messages."""

    path = ""


def read_labels(path: Path, ids: dict[str, str]) -> LabelTable:
    """The labels CSV (columns slide, label, [patient], [split]) matched to the slides;
    raises SourceError naming the file and line."""
    if not path.is_file():
        raise SourceError(f"{path}: labels file not found (--labels)")
    alias: dict[str, str] = {}
    for sid, rel in ids.items():
        for a in {sid, rel, Path(rel).name, Path(rel).stem}:
            alias.setdefault(a, sid)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or ())
        if "slide" not in cols or not cols & {"label", "patient", "split"}:
            raise SourceError(f"{path}: expected columns slide,label[,patient][,split], "
                              f"found {reader.fieldnames}")  # fmt: skip
        table = LabelTable()
        table.path = str(path)
        for row in reader:
            sid = alias.get((row.get("slide") or "").strip())
            if sid is None:
                raise SourceError(f"{path}: line {reader.line_num}: slide {row.get('slide')!r} "
                                  "is not among the slides found in --src")  # fmt: skip
            split = (row.get("split") or "").strip().lower() or None
            split = {"val": "valid", "validation": "valid"}.get(split, split)
            if split not in (None, *SPLITS):
                raise SourceError(f"{path}: line {reader.line_num}: split {split!r} is not one "
                                  f"of {', '.join(SPLITS)}")  # fmt: skip
            label = (row.get("label") or "").strip() or None
            table[sid] = Label(label, (row.get("patient") or "").strip() or None, split)
    missing = [rel for sid, rel in ids.items() if sid not in table]
    if missing:
        raise SourceError(f"{path}: no row for slide {missing[0]} ({len(missing)} slides "
                          "without one): add them or move them out of --src")  # fmt: skip
    return table


def find_annotations(folder: Path, ids: dict[str, str]) -> dict[str, str]:
    """slide id -> its annotation file in `folder` (matched by file stem); one warning line
    for files that match no slide."""
    if not folder.is_dir():
        raise SourceError(f"{folder}: annotations folder not found (--annotations)")
    by_stem = {}
    for sid, rel in ids.items():
        by_stem.setdefault(Path(rel).stem, sid)
        by_stem.setdefault(sid, sid)
    found: dict[str, str] = {}
    orphans = []
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() not in ann.ANNOTATION_EXTENSIONS or p.name.startswith("."):
            continue
        sid = by_stem.get(p.stem)
        if sid is None:
            orphans.append(p)
        elif sid in found:
            raise UsageError(f"{p}: a second annotation file for slide {ids[sid]} "
                             f"(first: {found[sid]})")  # fmt: skip
        else:
            found[sid] = str(p)
    if orphans:
        warn(
            f"{orphans[0]}: annotations for a slide not in --src (ignored; {len(orphans)} "
            "such files)"
        )
    return found


def check_slides(root: Path, ids: dict[str, str], opts: TilingOptions) -> dict[str, str]:
    """Open every slide (metadata only): rel path -> reason for those that cannot be opened;
    raises UsageError (exit 2) for the first slide without µm/px when --assume-mpp is not set."""
    rejected, no_mpp = {}, []
    for rel in ids.values():  # opening reads headers only: no progress bar needed
        try:
            with open_slide(root / rel, backend=opts.backend, assume_mpp=opts.assume_mpp) as s:
                if s.mpp is None:
                    no_mpp.append(rel)
        except SlideError as e:
            rejected[rel] = str(e).removeprefix(f"{root / rel}: ")
    if no_mpp:
        raise UsageError(
            f"{root / no_mpp[0]}: no microns-per-pixel in the slide's metadata "
            f"({len(no_mpp)} such slides); give --assume-mpp M (the level-0 µm/px: 0.25 at "
            "40x, 0.5 at 20x) to tile them"
        )
    return rejected


def survey_all(jobs: list[SlideJob], w: WsiOptions) -> list[dict]:
    """Survey records of every slide, in `jobs` order. This rank surveys its share first
    (jobs r::world), then the rest, which other ranks have usually cached by then."""
    order = jobs[w.rank :: w.world] + [j for i, j in enumerate(jobs) if i % w.world != w.rank]
    fn = functools.partial(survey, opts=w.tiling, out=w.out)
    pool = (
        multiprocessing.Pool(min(w.workers, len(order)))
        if w.workers > 1 and len(order) > 1
        else None
    )
    try:
        done = pool.imap(fn, order) if pool else map(fn, order)
        recs = {r["id"]: r for r in tqdm(done, total=len(order), desc="survey", unit="slide",
                                         dynamic_ncols=True, leave=False)}  # fmt: skip
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return [recs[j.slide_id] for j in jobs]


def slide_items(records: list[dict], labels: LabelTable | None, regions: dict | None):
    """(classes, one Item per slide): label index or None, group = patient else slide id."""
    if regions is not None:
        classes = ANNOTATION_CLASSES
    elif labels is not None:
        classes = sort_classes({labels[r["id"]].label for r in records} - {None})
    else:
        classes = []
    items = []
    for r in records:
        row = labels[r["id"]] if labels else Label(None, None, None)
        label = _slide_label(r, row, classes, regions, labels_path(labels))
        extra = {"slide": r["id"], "tiles": r["tiles"], "patient": row.patient, "split": row.split}
        items.append(Item(r["id"], r["path"], label, row.patient or r["id"], extra))
    return classes, items


def _slide_label(rec: dict, row: Label, classes: list[str], regions, where: str) -> int | None:
    if regions is not None:
        has = rec["id"] in regions and bool(regions[rec["id"]].tumour)
        if row.label is None:
            return int(has)
        name = {"0": "normal", "1": "tumor", "tumour": "tumor"}.get(
            row.label.lower(), row.label.lower()
        )
        if name not in classes:
            raise SourceError(f"{where}: slide {rec['path']}: label {row.label!r} is not one of "
                              f"{classes} (0/1) as annotations need")  # fmt: skip
        if name == "tumor" and not has:
            raise SourceError(f"{where}: slide {rec['path']} is labelled tumor but has no tumour "
                              "annotation in --annotations: its tiles cannot be labelled")  # fmt: skip
        return classes.index(name)
    if not classes:
        return None
    if row.label is None:
        raise SourceError(f"{where}: slide {rec['path']}: empty label")
    return classes.index(row.label)


class WsiReader(Reader):
    """Reads segment items (`extra`: slide, start, stop) as their tiles: yields one Item per
    tile (key `<slide>_x<X>_y<Y>`, JSON fields of docs/wsi.md) with its uint8 array. A slide
    that fails while reading yields its error once and no more tiles."""

    def __init__(self, root: str, out: str, tiling: TilingOptions, coverage: float | None,
                 threads: int = READ_THREADS):  # fmt: skip
        self.root, self.out, self.tiling, self.coverage = root, out, tiling, coverage
        self.threads = threads  # reading a slide's regions (embed --slides: --read-threads)
        self.bytes_per_sample = tiling.tile_size**2 * 3 // 6  # JPEG q95 on H&E: about 6:1

    def read(self, items: Sequence[Item]) -> Iterator[tuple[Item, Payload | Exception]]:
        for seg in items:
            yield from self._segment(seg)

    def _segment(self, seg: Item) -> Iterator[tuple[Item, Payload | Exception]]:
        sid, start, stop = seg.extra["slide"], seg.extra["start"], seg.extra["stop"]
        arrays = load_tiles(self.out, sid)
        t = self.tiling
        try:
            with open_slide(Path(self.root) / seg.source, backend=t.backend,
                            assume_mpp=t.assume_mpp) as slide:  # fmt: skip
                g = geometry(slide, mpp=t.mpp, tile_size=t.tile_size)
                tiles = [Tile(int(arrays["x"][i]), int(arrays["y"][i]), g.level, g.read_size,
                              g.extent, float(arrays["tissue"][i])) for i in range(start, stop)]  # fmt: skip
                for i, px in zip(
                    range(start, stop),
                    read_tiles(
                        slide,
                        tiles,
                        t.tile_size,
                        threads=self.threads,
                        ahead=max(READ_AHEAD, 4 * self.threads),
                    ),  # fmt: skip
                    strict=False,
                ):
                    yield self._tile_item(seg, arrays, i, tiles[i - start]), px
        except SlideError as e:
            yield seg, e

    def _tile_item(self, seg: Item, arrays: dict[str, np.ndarray], i: int, tile: Tile) -> Item:
        sid = seg.extra["slide"]
        extra = {"slide": sid, "x": tile.x, "y": tile.y, "level": tile.level,
                 "mpp": self.tiling.mpp, "tissue": tile.tissue, "extent": tile.extent}  # fmt: skip
        label = seg.label
        if self.coverage is not None:  # labelled by annotations; no file: nothing annotated
            extra["annotated"] = float(arrays["annotated"][i]) if "annotated" in arrays else 0.0
            label = int(extra["annotated"] >= self.coverage)
        if seg.extra.get("patient"):
            extra["patient"] = seg.extra["patient"]
        return Item(clean_key(f"{sid}_x{tile.x}_y{tile.y}"), seg.source, label, seg.group, extra)

    def signature(self, items: Sequence[Item]) -> str:
        paths = sorted({str(Path(self.root) / it.source) for it in items})
        return f"{self.tiling}|{self.coverage}|{stat_signature(paths)}"
