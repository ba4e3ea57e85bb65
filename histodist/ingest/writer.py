"""Write one tar shard (in a worker process) and check shards against their records.

A shard is written under a hidden temporary name (histodist.fileio) and renamed when complete, so a file named `*.tar` is
always whole. Its record (counts, bytes, sha256, statistics) goes to `.shardinfo/<name>.json`
beside it, just before the rename, with a fingerprint of its planned content: a re-run skips a shard whose file still
hashes to the record and whose plan is unchanged. Tar headers carry no time or owner, so the same
plan always gives byte-identical shards, whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histodist.fileio import atomic_path, atomic_write, file_digest
from histodist.ingest import imageio
from histodist.ingest.sources import Item, Reader

INFO_DIR = ".shardinfo"
WRITER_VERSION = 2  # bump when the bytes written for the same plan change: forces rewrites


@dataclass
class ShardTask:
    """One shard to write: `items` in order, read by `reader`, encoded with `encoding`."""

    out_dir: str
    name: str
    items: list[Item]
    reader: Reader
    classes: list[str]
    encoding: str = "auto"
    quality: int = 95
    stats: bool = False  # accumulate per-channel histograms for mean/std (train split)

    def fingerprint(self) -> str:
        h = hashlib.sha256(
            f"{WRITER_VERSION}|{self.encoding}|{self.quality}|{self.classes}".encode()
        )
        for it in self.items:
            h.update(
                f"\n{it.key}|{it.source}|{it.label}|{it.group}|{sorted(it.extra.items())}".encode()
            )
        h.update(self.reader.signature(self.items).encode())  # sources edited since: rewrite
        return h.hexdigest()


def reusable(task: ShardTask) -> dict | None:
    """The previous record of this shard if its file is complete, unchanged and planned alike."""
    return finished_record(Path(task.out_dir), task.name, task.fingerprint())


def finished_record(out: Path, name: str, fingerprint: str) -> dict | None:
    """The record (.shardinfo/<name>.json) of the finished shard `out/name` when it was written
    for `fingerprint` and the file still has the recorded size and sha256, else None: what
    lets an interrupted shard or embed run skip the shards it already finished."""
    path, info = out / name, out / INFO_DIR / f"{name}.json"
    try:
        rec = json.loads(info.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("fingerprint") != fingerprint or not path.is_file():
        return None
    if rec.get("bytes") != path.stat().st_size:
        return None
    return rec if file_digest(path) == rec.get("sha256") else None


def write_shard(task: ShardTask) -> dict:
    """Write the shard (or reuse a complete one); return its record (see `_new_record`)."""
    rec = reusable(task)
    if rec is not None:
        return {**rec, "reused": True}
    rec = _new_record(task)
    hist = np.zeros((3, 256), np.int64)  # exact integer counts, cheap: np.bincount per channel
    with atomic_path(Path(task.out_dir) / task.name) as tmp:  # no partial shard left on error
        _fill(tmp, task, rec, hist)
        rec["bytes"], rec["sha256"] = tmp.stat().st_size, file_digest(tmp)
        v = np.arange(256) / 255.0
        rec["sum"], rec["sumsq"] = (hist @ v).tolist(), (hist @ (v * v)).tolist()
        rec["pixels"] = int(hist[0].sum())
        # The record before the rename: a shard file always has its record, so a tar without
        # one is never the writer's (histodist.ingest.outdir); a record whose rename did not
        # happen matches no file and is rewritten by the next run.
        atomic_write(_info_path(task), json.dumps(rec))
    return {**rec, "reused": False}


def _fill(tmp: Path, task: ShardTask, rec: dict, hist: np.ndarray) -> None:
    """Read, check, encode and append every sample of the task to the tar file `tmp`."""
    with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for item, payload in task.reader.read(task.items):
            if isinstance(payload, Exception):
                _reject(rec, item, getattr(payload, "strerror", None) or str(payload))
                continue
            try:
                enc = imageio.prepare(payload, task.encoding, task.quality)
            except imageio.DecodeError as e:
                _reject(rec, item, str(e))
                continue
            _add_sample(tar, item, enc, task.classes)
            _count(rec, item, enc, hist if task.stats else None)


def _new_record(task: ShardTask) -> dict:
    return {
        "name": task.name,
        "fingerprint": task.fingerprint(),
        "num_samples": 0,
        "class_counts": [0] * len(task.classes),
        "unlabelled": 0,
        "converted": dict.fromkeys(imageio.CONVERSIONS, 0),
        "rejected": [],
        "sizes": {},  # "HxW" -> count
        "pixels": 0,  # pixels summed into sum / sumsq (values in [0, 1])
    }


def _reject(rec: dict, item: Item, reason: str) -> None:
    rec["rejected"].append({"key": item.key, "source": item.source, "reason": reason})


def _count(rec: dict, item: Item, enc: imageio.Encoded, hist: np.ndarray | None) -> None:
    rec["num_samples"] += 1
    if item.label is None:
        rec["unlabelled"] += 1
    else:
        rec["class_counts"][item.label] += 1
    if enc.converted:
        rec["converted"][enc.converted] += 1
    h, w = enc.pixels.shape[:2]
    rec["sizes"][f"{h}x{w}"] = rec["sizes"].get(f"{h}x{w}", 0) + 1
    if hist is not None:
        for c in range(3):
            hist[c] += np.bincount(enc.pixels[..., c].ravel(), minlength=256)


def _add_sample(tar: tarfile.TarFile, item: Item, enc: imageio.Encoded, classes: list[str]) -> None:
    h, w = enc.pixels.shape[:2]
    meta = {
        "source": item.source,
        "label_name": None if item.label is None else classes[item.label],
        "group": item.group,
        "width": w,
        "height": h,
        **item.extra,
    }
    members = [(enc.ext, enc.data)]
    if item.label is not None:
        members.append(("cls", str(item.label).encode()))
    members.append(("json", json.dumps(meta, sort_keys=True).encode()))
    for ext, data in members:
        info = tarfile.TarInfo(f"{item.key}.{ext}")
        info.size, info.mode, info.mtime = len(data), 0o444, 0  # no time: reproducible bytes
        tar.addfile(info, io.BytesIO(data))


def _info_path(task: ShardTask) -> Path:
    return Path(task.out_dir) / INFO_DIR / f"{task.name}.json"


def read_shard_keys(path: str | Path) -> Counter:
    """Sample key -> number of members, read with plain tarfile (raises on a damaged tar)."""
    keys: Counter = Counter()
    with tarfile.open(path) as tar:
        for m in tar:
            if m.isfile():
                keys[m.name.split(".", 1)[0]] += 1
                tar.extractfile(m).read()  # read every byte: truncation shows up here
    return keys
