"""Read what a wandb run wrote offline: its `.wandb` record log.

wandb (>= 0.17, written by its Go core) stores an offline run as `run-<id>.wandb`: a 7-byte
header (":W&B", magic 0xBEE1, version 0), then LevelDB's log format (32 KiB blocks of
records with a 7-byte header: CRC-32 of type and data, length, type FULL / FIRST / MIDDLE /
LAST), each record a `wandb_internal_pb2.Record` protobuf. wandb 0.31 ships no Python reader,
so this is one, checked against the CRCs:

    run = read_run(wandb_file(tmp_path))
    run.history[-1]["val/auc"], run.summary["best/auc"], run.config["lr"]

Values are parsed from their JSON; a value wandb splits into parts (an image's `_type`,
`path`, ...) appears as one key per part, joined by dots ("val/roc._type").
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

HEADER = struct.Struct("<4sHB")
RECORD = struct.Struct("<IHB")
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class WandbRun:
    """One offline run: its id and name, config, history rows (in order), final summary,
    defined metrics {name: summary kinds}, and logged artifacts (protobuf records)."""

    run_id: str = ""
    name: str = ""
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    metrics: dict[str, set[str]] = field(default_factory=dict)
    artifacts: list = field(default_factory=list)
    exit_code: int | None = None


def records(path: Path):
    """The protobuf records of a `.wandb` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, version = HEADER.unpack_from(data)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a .wandb log"
    pos, parts = HEADER.size, []
    while pos + RECORD.size <= len(data):
        left = BLOCK - pos % BLOCK  # blocks count from the start of the file, header included
        crc, n, kind = RECORD.unpack_from(data, pos)
        if left < RECORD.size or kind == 0:  # zero padding up to the next block
            pos += left
            continue
        chunk = data[pos + RECORD.size : pos + RECORD.size + n]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad CRC at {pos}"
        pos += RECORD.size + n
        parts = [chunk] if kind in (FULL, FIRST) else [*parts, chunk]
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            yield rec


def _items(items) -> dict:
    return {(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in items}


def read_run(path: Path) -> WandbRun:
    """Replay a `.wandb` file: config and summary updates applied in order."""
    if "wandb" in sys.modules:  # a run of this process: its file is whole once wandb's
        sys.modules["wandb"].teardown()  # service stopped (finish() returns before that)
    run = WandbRun()
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.name = rec.run.run_id, rec.run.display_name
            run.config.update(_items(rec.run.config.update))
        elif kind == "config":
            run.config.update(_items(rec.config.update))
        elif kind == "history":
            run.history.append(_items(rec.history.item))
        elif kind == "summary":
            run.summary.update(_items(rec.summary.update))
            for item in rec.summary.remove:
                run.summary.pop(item.key, None)
        elif kind == "metric" and rec.metric.name:
            s = rec.metric.summary
            kinds = {k for k in ("min", "max", "mean", "best", "last") if getattr(s, k)}
            run.metrics[rec.metric.name] = kinds
        elif kind == "artifact":
            run.artifacts.append(rec.artifact)
        elif kind == "exit":
            run.exit_code = rec.exit.exit_code
    return run


def wandb_files(wandb_dir: Path) -> list[Path]:
    """The `.wandb` files of the offline runs under WANDB_DIR (or a run folder), oldest first."""
    return sorted(Path(wandb_dir).glob("**/offline-run-*/run-*.wandb"))


def wandb_file(wandb_dir: Path) -> Path:
    """The one offline run's `.wandb` file under `wandb_dir`."""
    found = wandb_files(wandb_dir)
    assert len(found) == 1, f"{wandb_dir}: {len(found)} offline wandb runs: {found}"
    return found[0]
