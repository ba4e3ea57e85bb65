"""Write one tar shard (in a worker process) and check shards against their records.

A shard is written under a hidden temporary name (histodist.fileio) and renamed when complete, so a file named `*.tar` is
always whole. Its record (counts, bytes, sha256, statistics) goes to `.shardinfo/<name>.json`
beside it, just before the rename, with a fingerprint of its planned content: a re-run skips a shard whose file still
hashes to the record and whose plan is unchanged. Tar headers carry no time or owner, so the same
plan always gives byte-identical shards, whatever the number of workers.

A task with a `unit_key` (slide tiles) is written in parts: each of its items (a slide segment,
which the reader expands into many samples) becomes a small tar of its own under
`.parts/<shard>/`, resumable like a shard, and `assemble` concatenates the parts' members into
the shard, leaving out every unit (slide) one of whose parts failed. So a re-run after a kill
redoes only the parts that were not finished, and every sample is written once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import tarfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from histodist.fileio import atomic_path, atomic_write, file_digest
from histodist.ingest import imageio
from histodist.ingest.sources import Item, Reader

INFO_DIR = ".shardinfo"
PARTS_DIR = ".parts"
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
    unit_key: str | None = None  # write in parts, one per item; item.extra[unit_key]: its unit

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
        rec["data_bytes"] = tar.offset  # where the end-of-archive blocks start (for `assemble`)


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


def part_tasks(task: ShardTask) -> list[ShardTask]:
    """The parts of a `unit_key` task: one task per item, written under `.parts/<shard>/`."""
    folder = Path(task.out_dir) / PARTS_DIR / task.name
    return [
        replace(task, out_dir=str(folder), name=f"part-{i:05d}.tar", items=[it], unit_key=None)
        for i, it in enumerate(task.items)
    ]


def failed_units(task: ShardTask, part_records: list[dict]) -> dict[str, str]:
    """unit -> reason, for the units of `task` one of whose parts rejected a sample (a slide
    that failed while reading: the reader stopped it there)."""
    failed: dict[str, str] = {}
    for item, rec in zip(task.items, part_records, strict=True):
        if rec["rejected"]:
            failed.setdefault(item.extra[task.unit_key], rec["rejected"][0]["reason"])
    return failed


def assemble(task: ShardTask, part_records: list[dict], failed: dict[str, str]) -> dict:
    """Write the shard of a `unit_key` task from its finished parts (records in item order),
    leaving out the units in `failed`; return its record, which adds `units` (unit, start,
    count: where each unit's samples lie in the shard) and `dropped` (unit, reason)."""
    rec = {**_new_record(task), "sum": [0.0] * 3, "sumsq": [0.0] * 3, "units": [], "dropped": []}
    parts = []
    for i, (item, prec) in enumerate(zip(task.items, part_records, strict=True)):
        unit = item.extra[task.unit_key]
        if unit in failed:
            if not rec["dropped"] or rec["dropped"][-1]["unit"] != unit:
                rec["dropped"].append({"unit": unit, "reason": failed[unit]})
            continue
        parts.append((i, prec["data_bytes"]))
        _merge(rec, prec, unit)
    folder = Path(task.out_dir) / PARTS_DIR / task.name
    digest = hashlib.sha256()
    with atomic_path(Path(task.out_dir) / task.name) as tmp, open(tmp, "wb") as out:
        for i, size in parts:
            with open(folder / f"part-{i:05d}.tar", "rb") as f:
                _copy(f, out, size, digest)
        end = tarfile.BLOCKSIZE * 2  # tarfile's end of archive, padded to a whole record
        end += -(out.tell() + end) % tarfile.RECORDSIZE
        out.write(b"\0" * end)
        digest.update(b"\0" * end)
        rec["bytes"], rec["sha256"] = out.tell(), digest.hexdigest()
    atomic_write(_info_path(task), json.dumps(rec))
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty: other shards' parts are still there
        folder.parent.rmdir()
    return {**rec, "reused": False}


def _merge(rec: dict, part: dict, unit: str) -> None:
    """Add a part's counts and statistics to the shard record `rec`."""
    if part["num_samples"]:
        units = rec["units"]
        if units and units[-1]["unit"] == unit:
            units[-1]["count"] += part["num_samples"]
        else:
            units.append({"unit": unit, "start": rec["num_samples"], "count": part["num_samples"]})
    for k in ("num_samples", "unlabelled", "pixels"):
        rec[k] += part[k]
    for k in ("class_counts", "sum", "sumsq"):
        rec[k] = [a + b for a, b in zip(rec[k], part[k], strict=True)]
    for k, v in part["converted"].items():
        rec["converted"][k] += v
    for k, v in part["sizes"].items():
        rec["sizes"][k] = rec["sizes"].get(k, 0) + v


def _copy(src, dst, size: int, digest) -> None:
    while size > 0:
        chunk = src.read(min(size, 1 << 22))
        if not chunk:
            raise OSError(f"{src.name}: shorter than its record says")
        dst.write(chunk)
        digest.update(chunk)
        size -= len(chunk)
