"""`python -m histodist.bench wsi`: slide tiling throughput against a hand-written loop.

    python -m histodist.bench wsi [--slide ../shared/data/wsi/CMU-1-Small-Region.svs]
                                  [--pcam ../shared/data/pcam-jpeg] [--side 8192] [--json F]

For the real slide and for a larger synthetic pyramid (real PCam patches on white, 0.25 µm/px,
levels 1, 2, 4, 16 as a pyramidal tiled TIFF), the same tissue tiles at --mpp / --tile-size:
  histodist    tiling.read_tiles: the best level, READ_THREADS threads reading ahead, resize;
  baseline     the hand-written loop: openslide read_region per tile at level 0, RGBA -> RGB,
               PIL resize (LANCZOS) to the tile size, one thread;
  shard        the whole `python -m histodist.shard --dataset wsi` (survey, JPEG q95, tar) with
               one worker, as tiles per second of the command.
Figures: tiles/s of wall clock and tiles per CPU-second (all threads of the process: the
per-core figure, robust to other jobs on a shared machine), medians of --repeats interleaved
repeats after one warm-up pass (slide file in the page cache, openslide's tile cache warm).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from histodist.bench.common import machine_info, table, write_json
from histodist.samples import bench_images

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SLIDE = ROOT.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"


def synthetic_pyramid(path: Path, pcam: Path, side: int, mpp: float = 0.25) -> Path:
    """A side x side px slide: real PCam patches (resized to 256 px) filling an ellipse on
    white, written with levels 1, 2, 4, 16 (deflate tiles: JPEG needs imagecodecs)."""
    import tifffile
    from PIL import Image

    files = sorted(pcam.glob("train/*/*.jpg"))[:4000]
    if not files:
        raise SystemExit(f"histodist.bench wsi: no PCam JPEGs under {pcam} (--pcam)")
    img = np.full((side, side, 3), 255, np.uint8)
    cells = side // 256
    k = 0
    for r in range(cells):
        for c in range(cells):
            if ((c + 0.5) / cells - 0.5) ** 2 + ((r + 0.5) / cells - 0.5) ** 2 <= 0.16:
                patch = Image.open(files[k % len(files)]).convert("RGB").resize((256, 256))
                img[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256] = np.asarray(patch)
                k += 1
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, ds in enumerate((1, 2, 4, 16)):
            level = (
                img
                if ds == 1
                else np.asarray(
                    Image.fromarray(img).resize((side // ds, side // ds), Image.Resampling.BOX)
                )
            )
            tw.write(level, tile=(256, 256), photometric="rgb", compression="zlib",
                     metadata=None, subfiletype=int(i > 0),
                     resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)),
                     resolutionunit="CENTIMETER")  # fmt: skip
    return path


def baseline(path: Path, tiles, tile_size: int) -> int:
    """The hand-written loop: read_region at level 0 per tile, PIL resize."""
    import openslide
    from PIL import Image

    s = openslide.OpenSlide(str(path))
    n = 0
    for t in tiles:
        region = s.read_region((t.x, t.y), 0, (t.extent, t.extent)).convert("RGB")
        np.asarray(region.resize((tile_size, tile_size), Image.Resampling.LANCZOS))
        n += 1
    s.close()
    return n


def histodist_read(path: Path, tiles, tile_size: int) -> int:
    from histodist.ingest.slides.reader import open_slide
    from histodist.ingest.slides.tiling import read_tiles

    with open_slide(path) as s:
        return sum(1 for _ in read_tiles(s, tiles, tile_size))


def shard_run(path: Path, mpp: float, tile_size: int, work: Path) -> int:
    """The whole shard command on one slide, one worker, into a fresh folder."""
    from histodist import shard

    out = Path(tempfile.mkdtemp(dir=work))
    args = ["--dataset", "wsi", "--src", str(path), "--out", str(out), "--mpp", str(mpp),
            "--tile-size", str(tile_size), "--workers", "1"]  # fmt: skip
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null), \
            contextlib.redirect_stdout(null):  # fmt: skip
        if shard.main(args) != 0:
            raise RuntimeError(f"histodist.shard {' '.join(args)} failed")
    import json

    m = json.loads((out / "manifest.json").read_text())
    return sum(s["num_samples"] for s in m["splits"].values())


def measure(fns: dict, repeats: int) -> dict[str, dict]:
    """Interleaved repeats of each fn() -> tiles; medians of tiles/s and tiles/CPU-s."""
    for fn in fns.values():  # warm-up: page cache, openslide's tile cache, imports
        fn()
    rates: dict[str, list] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            n = fn()
            wall, cpu = time.perf_counter() - t0, max(time.process_time() - c0, 1e-6)
            rates[name].append((n, n / wall, n / cpu))
    return {k: {"tiles": v[0][0], "tiles_per_s": round(statistics.median(r[1] for r in v), 1),
                "tiles_per_cpu_s": round(statistics.median(r[2] for r in v), 1)}
            for k, v in rates.items()}  # fmt: skip


def bench_slide(path: Path, mpp: float, tile_size: int, repeats: int, work: Path) -> dict:
    from histodist.ingest.slides.reader import open_slide
    from histodist.ingest.slides.tiling import plan_tiles

    with open_slide(path) as s:
        t0 = time.perf_counter()
        tiles = plan_tiles(s, mpp=mpp, tile_size=tile_size, min_tissue=0.5)
        plan_s = time.perf_counter() - t0
        info = {"slide": path.name, "size": f"{s.dimensions[0]}x{s.dimensions[1]}",
                "slide_mpp": round(s.mpp, 4), "levels": [round(d, 2) for d in s.level_downsamples],
                "level": tiles[0].level if tiles else None,
                "read_size": tiles[0].read_size if tiles else None, "plan_s": round(plan_s, 2)}  # fmt: skip
    figures = measure({
        "histodist": lambda: histodist_read(path, tiles, tile_size),
        "baseline": lambda: baseline(path, tiles, tile_size),
        "shard": lambda: shard_run(path, mpp, tile_size, work),
    }, repeats)  # fmt: skip
    h, b = figures["histodist"], figures["baseline"]
    info["speedup_per_core"] = round(h["tiles_per_cpu_s"] / b["tiles_per_cpu_s"], 2)
    return {**info, **{k: v for k, v in figures.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m histodist.bench wsi", description=__doc__.split("\n")[0]
    )
    p.add_argument("--slide", type=Path, default=DEFAULT_SLIDE, help="a real slide")
    p.add_argument("--pcam", type=Path, default=bench_images(), help="pcam-jpeg style folder, "
                   "for the pyramid")  # fmt: skip
    p.add_argument("--side", type=int, default=8192, help="synthetic slide side in px (8192)")
    p.add_argument("--mpp", type=float, default=0.5)
    p.add_argument("--tile-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        slides = [args.slide] if args.slide.is_file() else []
        slides.append(synthetic_pyramid(work / "synthetic.tif", args.pcam, args.side))
        for path in slides:
            rows.append(bench_slide(path, args.mpp, args.tile_size, args.repeats, work))
    flat = [{"slide": r["slide"], "size": r["size"], "level": r["level"], "read": r["read_size"],
             **{f"{k}_{u}": r[k][u] for k in ("histodist", "baseline", "shard")
                for u in ("tiles_per_s", "tiles_per_cpu_s")},
             "tiles": r["histodist"]["tiles"], "x_per_core": r["speedup_per_core"]}
            for r in rows]  # fmt: skip
    cols = list(flat[0])
    print(table(flat, cols))
    if args.json:
        write_json(args.json, {"machine": machine_info(), "mpp": args.mpp,
                               "tile_size": args.tile_size, "slides": rows})  # fmt: skip
    return 0
