"""`python -m histodist.bench shard [--src ../shared/data/pcam-jpeg]`: sharding throughput.

Prints
  (a) images/s (wall clock) and images per CPU-second of `python -m histodist.shard --dataset
      folder` over the whole sample, with 1 and 2 workers (any --workers list), each into a
      fresh folder, with the load average (other jobs on the machine slow the wall clock);
  (b) for every encoding (original JPEG bytes, png, raw .npy, jpeg q95) on the first --limit
      images: bytes per image in the tar (member + headers + .cls + .json), and per CPU-second
      the shard write speed (one worker) and the decode speed of the image member (PIL or
      np.load, one thread);
  (c) the same for the PCam HDF5 path (pixel arrays -> png or raw), from an HDF5 file built
      out of the sample's decoded pixels (JPEG-decoded, so PNG sizes are indicative).
Figures, not tests: they depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from histodist.samples import bench_images


def _cpu() -> float:
    """CPU seconds of this process and its reaped children (the shard workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def shard_once(args: list[str]) -> tuple[dict, float, float]:
    """Run histodist.shard quietly; return (manifest, wall seconds, CPU seconds)."""
    import contextlib

    from histodist import shard

    t0, c0 = time.perf_counter(), _cpu()
    with (
        open(os.devnull, "w") as null,
        contextlib.redirect_stderr(null),
        contextlib.redirect_stdout(null),
    ):
        rc = shard.main(args)
    dt, cpu = time.perf_counter() - t0, max(_cpu() - c0, 1e-6)
    if rc != 0:
        raise RuntimeError(f"histodist.shard {' '.join(args)} failed ({rc})")
    out = Path(args[args.index("--out") + 1])
    return json.loads((out / "manifest.json").read_text()), dt, cpu


def decode_rate(out: Path, manifest: dict, split: str) -> float:
    """Images per CPU-second decoding every image member of a split (from memory, one thread)."""
    from PIL import Image

    blobs = []
    for sh in manifest["splits"][split]["shards"]:
        with tarfile.open(out / sh["name"]) as tar:
            for m in tar:
                ext = m.name.split(".", 1)[1]
                if ext in ("jpg", "png", "tif", "npy"):
                    blobs.append((ext, tar.extractfile(m).read()))
    t0 = time.process_time()  # CPU time: robust to other jobs sharing the cores
    for ext, data in blobs:
        if ext == "npy":
            np.load(io.BytesIO(data), allow_pickle=False)
        else:
            np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return len(blobs) / max(time.process_time() - t0, 1e-6)  # clock ticks: tiny inputs read 0


def subset(src: Path, dst: Path, limit: int) -> Path:
    """Symlink the first limit/2 images of each class of src/train into dst/<class>/."""
    for label in ("0", "1"):
        (dst / label).mkdir(parents=True)
        for p in sorted((src / "train" / label).glob("*.jpg"))[: limit // 2]:
            (dst / label / p.name).symlink_to(p.resolve())
    return dst


def h5_from(folder: Path, dst: Path) -> Path:
    """A PCam-layout train_x/_y.h5 holding the (decoded) pixels of folder/<class>/*.jpg."""
    import h5py
    from PIL import Image

    paths = sorted(folder.glob("*/*.jpg"))
    x = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    y = np.array([int(p.parent.name) for p in paths], np.uint8).reshape(-1, 1, 1, 1)
    dst.mkdir()
    with h5py.File(dst / "camelyonpatch_level_2_split_train_x.h5", "w") as f:
        f.create_dataset("x", data=x, chunks=(min(32, len(x)), 96, 96, 3))
    with h5py.File(dst / "camelyonpatch_level_2_split_train_y.h5", "w") as f:
        f["y"] = y
    return dst


def encoding_rows(tmp: Path, src: Path, dataset: str, encodings, split: str) -> list[dict]:
    """One row per encoding: tar bytes per image, write and decode speed (per CPU-second)."""
    rows = []
    for enc in encodings:
        out = tmp / f"{dataset}-{enc}"
        args = ["--dataset", dataset, "--src", str(src), "--out", str(out)]
        args += ["--encoding", enc, "--workers", "1"]
        if dataset == "folder":
            args += ["--val-fraction", "0", "--test-fraction", "0"]
        m, _, cpu = shard_once(args)
        s = m["splits"][split]
        n, size = s["num_samples"], sum(sh["bytes"] for sh in s["shards"])
        rows.append(
            {
                "source": dataset,
                "encoding": enc,
                "images": n,
                "bytes_per_image": round(size / n),
                "write_images_per_cpu_s": round(n / cpu),
                "decode_images_per_cpu_s": round(decode_rate(out, m, split)),
            }
        )
    return rows


def throughput(src: Path, tmp: Path, workers: int) -> dict:
    """Shard the whole of `src` with `workers` processes into a fresh folder."""
    args = ["--dataset", "folder", "--src", str(src), "--out", str(tmp / f"w{workers}")]
    m, dt, cpu = shard_once([*args, "--workers", str(workers)])
    n = sum(s["num_samples"] for s in m["splits"].values())
    row = {"workers": workers, "images": n, "seconds": round(dt, 2), "cpu_seconds": round(cpu, 2)}
    row.update(images_per_s=round(n / dt), images_per_cpu_s=round(n / cpu))
    print(
        f"shard folder {src}: workers={workers}: {n} images in {dt:.1f} s = {n / dt:.0f} img/s "
        f"({n / cpu:.0f} img per CPU-second; load average {os.getloadavg()[0]:.1f})"
    )
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m histodist.bench shard", description=__doc__)
    p.add_argument("--src", default=bench_images(), help="pcam-jpeg style folder")
    p.add_argument("--workers", default="1,2", help="comma list of worker counts for (a)")
    p.add_argument("--limit", type=int, default=2000, help="images for the encoding comparison")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    src = Path(args.src)
    results: dict = {"throughput": [], "encodings": []}
    with tempfile.TemporaryDirectory(prefix="histodist-bench-shard-") as t:
        tmp = Path(t)
        for w in [int(x) for x in args.workers.split(",")]:
            results["throughput"].append(throughput(src, tmp, w))
        sub = subset(src, tmp / "subset", args.limit)
        encodings = ["original", "png", "raw", "jpeg"]
        results["encodings"] += encoding_rows(tmp, sub, "folder", encodings, "train")
        h5 = h5_from(sub, tmp / "h5")
        results["encodings"] += encoding_rows(tmp, h5, "pcam", ["png", "raw"], "train")
    print(
        f"{'source':8} {'encoding':9} {'bytes/img':>10} {'write img/cpu-s':>16} "
        f"{'decode img/cpu-s':>17}"
    )
    for r in results["encodings"]:
        print(
            f"{r['source']:8} {r['encoding']:9} {r['bytes_per_image']:>10} "
            f"{r['write_images_per_cpu_s']:>16} {r['decode_images_per_cpu_s']:>17}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0
