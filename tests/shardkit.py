"""Tiny test-shard writer in the docs/shards.md format (not the real sharder: histodist.shard).

    images = {"train": [(path, label), ...], "valid": [...]}
    manifest = write_shards(tmp_path / "shards", images, samples_per_shard=10)

Real images keep their bytes (`encoding="jpeg"`), or are re-encoded as PNG or raw uint8 `.npy`.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from datakit import first_patches
from PIL import Image


def pcam_images(root: Path, split: str, per_class: int) -> list[tuple[Path, int]]:
    """The first `per_class` images of each class of pcam-jpeg/<split>, as (path, label)."""
    return [(p, label) for label in (0, 1) for p in first_patches(root, split, label, per_class)]


def _image_member(path: Path, encoding: str) -> tuple[str, bytes]:
    if encoding == "jpeg":
        return "jpg", path.read_bytes()
    arr = np.asarray(Image.open(path).convert("RGB"))
    buf = io.BytesIO()
    if encoding == "png":
        Image.fromarray(arr).save(buf, format="PNG")
        return "png", buf.getvalue()
    np.save(buf, arr, allow_pickle=False)
    return "npy", buf.getvalue()


def _write_split(out_dir: Path, split: str, items, sizes, encoding, extra) -> dict:
    shards, pos = [], 0
    for i, size in enumerate(sizes):
        name = f"{split}-{i:06d}.tar"
        with wds.TarWriter(str(out_dir / name)) as sink:
            for path, label in items[pos : pos + size]:
                ext, data = _image_member(Path(path), encoding)
                key = Path(path).stem
                meta = {"source": str(path), "label_name": str(label), "group": f"g{label}"}
                sample = {
                    "__key__": key,
                    ext: data,
                    "cls": str(label).encode(),
                    "json": json.dumps(meta).encode(),
                }
                sample.update(extra.get(key, {}))
                sink.write(sample)
        pos += size
        data = (out_dir / name).read_bytes()
        shards.append(
            {
                "name": name,
                "num_samples": size,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    labels = [label for _, label in items]
    return {
        "num_samples": len(items),
        "class_counts": [labels.count(0), labels.count(1)],
        "num_groups": 2,
        "shards": shards,
    }


def write_shards(
    out_dir,
    images_by_split: dict,
    samples_per_shard: int | list[int],
    *,
    encoding: str = "jpeg",
    extra_members: dict | None = None,
) -> dict:
    """Write `<split>-NNNNNN.tar` shards and manifest.json into out_dir; return the manifest.

    samples_per_shard: an int (the last shard takes the rest) or explicit sizes per shard
    (the same list for every split). extra_members: {key: {ext: bytes}} added to samples, e.g.
    a `.pickle` member that the loader must never unpickle.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, items in images_by_split.items():
        if isinstance(samples_per_shard, int):
            n = samples_per_shard
            sizes = [min(n, len(items) - i) for i in range(0, len(items), n)]
        else:
            sizes = list(samples_per_shard)
        assert sum(sizes) == len(items), (sizes, len(items))
        splits[split] = _write_split(out_dir, split, items, sizes, encoding, extra_members or {})
    manifest = {
        "format": "histodist-shards/1",
        "dataset": "pcam-test",
        "layout": "folder",
        "classes": ["0", "1"],
        "task": "binary",
        "group_by": None,
        "encoding": encoding,
        "image": {"height": 96, "width": 96, "mode": "RGB"},
        "mean": [0.70, 0.54, 0.69],
        "std": [0.23, 0.27, 0.21],
        "splits": splits,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def png_bomb(width: int, height: int) -> bytes:
    """A valid 8-bit RGB PNG of width x height black pixels, a few MB for 30000 x 30000, built
    without ever holding its pixels: the compressed rows are one full-flushed deflate segment
    repeated (each such segment starts afresh), closed by the Adler-32 of the zero bytes."""
    import struct
    import zlib

    row = 1 + 3 * width  # a filter byte, then RGB
    per = max(1, (1 << 22) // row)  # rows per segment

    def segment(rows: int) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        return c.compress(bytes(row * rows)) + c.flush(zlib.Z_FULL_FLUSH)

    full, rest = divmod(height, per)
    body = segment(per) * full + (segment(rest) if rest else b"")
    total = row * height
    adler = ((total % 65521) << 16) | 1  # zeros: a stays 1, b grows by 1 per byte
    idat = b"\x78\xda" + body + b"\x03\x00" + struct.pack(">I", adler)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
