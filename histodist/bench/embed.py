"""`python -m histodist.bench embed`: tiles/s of `histodist.embed --slides` on a real slide, and
where the time goes.

    python -m histodist.bench embed [--slide ../shared/data/wsi/CMU-1-Small-Region.svs]
        [--model vit_small_patch16_224] [--mpp 0.5] [--tile-size 224] [--batch-size 32]
        [--precision no bf16] [--repeats 3] [--json F]

The slide is surveyed once (tissue, tile plan: cached, as a re-run of embed finds it); then,
interleaved, for each precision:
  read   the slide's tiles through the embedding path's reader alone (TileStream: the tiler's
         regions read ahead in threads, resized, stacked into batches), no model;
  model  the backbone alone on as many tiles already in memory, in the same batches (transfer,
         preprocessing, forward pass, to the CPU);
  embed  the whole `embed --slides` of the slide (read, model, write; the slide's shard
         rewritten each time), with the manifest's split of its time: model, write, and waiting
         for tiles (reading the model did not hide).
Figures: tiles per second of wall clock and per CPU-second of the process (all threads: the
per-core figure, robust to other jobs on a shared machine), medians of --repeats repeats after
a warm-up pass. A timm name has random weights (seeded): the speed of a model does not depend
on its weights.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from histodist.bench.common import machine_info, table, write_json

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SLIDE = ROOT.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"


def setup(args, work: Path):
    """(the surveyed slide folder, its units, the backbone) for the benchmark."""
    from histodist.inference import slide_set
    from histodist.inference.backbone import Backbone, BuildArgs
    from histodist.inference.slide_embed import plan
    from histodist.ingest.slides.survey import TilingOptions
    from histodist.ingest.sources.wsi import WsiOptions

    wsi = WsiOptions(TilingOptions(args.mpp, args.tile_size, 0.5), str(work))
    with contextlib.redirect_stderr(open(os.devnull, "w")):  # noqa: SIM115 - the survey's bar
        folder = slide_set.find_slides(str(args.slide), wsi, slide_set.Options())
    bb = Backbone.build(BuildArgs(args.model))
    return folder, plan(folder.scan, folder.splits, bb.identity, wsi), bb


def read_pass(folder, units, batch_size: int) -> int:
    from histodist.inference.tile_stream import TileBatch, TileStream

    stream = TileStream(folder.scan.reader, [(u.slide, u.segment(), u.tiles) for u in units],
                        batch_size=batch_size)  # fmt: skip
    return sum(len(ev.items) for ev in stream if isinstance(ev, TileBatch))


def model_pass(engine, n: int, batch_size: int, size: int) -> int:
    x = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)
    done = 0
    while done < n:
        b = min(batch_size, n - done)
        engine(x[:b])
        done += b
    return n


def embed_pass(folder, bb, out: Path, precision: str, batch_size: int) -> dict:
    from histodist.inference import slide_set

    for p in out.glob("*.tar"):  # every run embeds the slide again
        p.unlink()
    amp = _autocast(precision)
    opts = slide_set.Options(batch_size=batch_size, progress=False)
    with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115
        m = slide_set.embed_slides(folder, out, bb, device="cpu", autocast=amp,
                                   precision=precision, opts=opts)  # fmt: skip
    return m["throughput"]


def _autocast(precision: str):
    if precision == "no":
        return None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return lambda: torch.autocast("cpu", dtype=dtype)


def _timed(n: int, fn, *args) -> dict:
    """fn(*args)'s tiles per second of wall clock and per CPU-second of this process (all its
    threads: the per-core figure, which other jobs on a shared machine do not change)."""
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn(*args)
    wall, cpu = time.perf_counter() - t0, max(time.process_time() - c0, 1e-6)
    return {"tiles_per_s": n / wall, "tiles_per_cpu_s": n / cpu, "result": result}


def bench(args, work: Path) -> list[dict]:
    from histodist.inference.slide_embed import Engine

    folder, units, bb = setup(args, work)
    n = sum(u.tiles for u in units)
    engines = {p: Engine(bb, torch.device("cpu"), _autocast(p)) for p in args.precision}
    size = bb.identity["preprocessing"]["input_size"]
    runs: dict[str, list] = {k: [] for k in ["read", *[f"{w}/{p}" for p in args.precision
                                                     for w in ("model", "embed")]]}  # fmt: skip
    for rep in range(args.repeats + 1):  # the first pass warms caches up and is dropped
        runs["read"].append(_timed(n, read_pass, folder, units, args.batch_size))
        for p in args.precision:
            runs[f"model/{p}"].append(_timed(n, model_pass, engines[p], n, args.batch_size, size))
            fig = _timed(n, embed_pass, folder, bb, work / f"emb-{p}", p, args.batch_size)
            t = fig.pop("result")
            runs[f"embed/{p}"].append({**fig, **{k: t[k] for k in ("seconds", "model_s",
                                                 "write_s", "wait_s", "read_s")}})  # fmt: skip
        if rep == 0:
            runs = {k: [] for k in runs}
    return [{"pass": k, "tiles": n, **{f: round(statistics.median(r[f] for r in v), 3)
                                      for f in v[0] if f != "result"}}
            for k, v in runs.items()]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m histodist.bench embed",
                                description=__doc__.split("\n")[0])  # fmt: skip
    p.add_argument("--slide", type=Path, default=DEFAULT_SLIDE, help="a real slide")
    p.add_argument("--model", default="vit_small_patch16_224", help="a timm name or hub model")
    p.add_argument("--mpp", type=float, default=0.5)
    p.add_argument("--tile-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", nargs="+", default=["no", "bf16"], choices=("no", "bf16"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = bench(args, Path(tmp))
    cols = sorted({k for r in rows for k in r}, key=lambda k: list(rows[-1]).index(k)
                  if k in rows[-1] else 1)  # fmt: skip
    print(f"{args.slide.name}, {args.model} at {args.tile_size} px, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(table(rows, cols))
    if args.json:
        write_json(args.json, {"machine": machine_info(), "model": args.model,
                               "slide": str(args.slide), "rows": rows})  # fmt: skip
    return 0
