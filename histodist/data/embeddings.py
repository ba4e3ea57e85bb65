"""Embedding shards: one float16 vector per sample, written by `histodist.embed`.

An embedding set is a shard folder (docs/shards.md) whose manifest has `"kind": "embeddings"`
and an `"embedding"` block (model, weights sha256, hub revision, preprocessing, dimension).
Each sample is `<key>.emb.npy` (float16 (D,), a plain .npy file), `<key>.cls` and `<key>.json`
(`{"group": ...}`, plus the tile's slide id and position for tiles of whole slides:
TILE_FIELDS). The training loader decodes a vector as a (D, 1, 1) float16 "image", so
batches, the loop, checkpoints and inference need no other path; the head flattens it. A set
of slide tiles also lists in its manifest, per slide, where its tiles are (histodist.data.bags).
"""

from __future__ import annotations

import io
import json
import re
import tarfile

import numpy as np
import torch

from histodist.config import ConfigError
from histodist.data.remote import ShardError

MEMBER = "emb.npy"
KIND = "embeddings"
HEADS = ("linear", "mlp")
# The tile JSON fields of the whole-slide tiler's shards that an embedding keeps when the tile
# has them: the slide, the top-left corner and side in level-0 pixels, the level read, the
# µm/px, the tissue fraction, and the annotated fraction (slides with region annotations: what
# a head's attention can be checked against); heatmaps and bags need nothing else.
TILE_FIELDS = ("slide", "x", "y", "level", "mpp", "tissue", "extent", "annotated")
_HEADER = re.compile(rb"\{'descr': '<f2', 'fortran_order': False, 'shape': \((\d+),\), \}")


class EmbeddingError(ConfigError):
    """Embedding shards used where they do not fit (other model, image run, ...)."""


def is_embedding_set(manifest: dict) -> bool:
    return manifest.get("kind") == KIND


def encode(vec: np.ndarray) -> bytes:
    """float (D,) -> the bytes of a float16 .npy file."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(vec, dtype="<f2"), allow_pickle=False)
    return buf.getvalue()


def decode_vector(data: bytes) -> torch.Tensor:
    """A float16 (D,) .npy file -> float16 (D,) tensor; np.save's header is parsed directly
    (np.load's parser costs ~0.3 ms a sample), anything else goes to np.load without pickle."""
    m = _HEADER.match(data, 10) if data[:8] == b"\x93NUMPY\x01\x00" else None
    if m is not None:
        start = 10 + int.from_bytes(data[8:10], "little")
        return torch.frombuffer(bytearray(data[start:]), dtype=torch.float16)
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.ndim != 1 or arr.dtype.kind != "f":
        raise EmbeddingError(f"embedding of dtype {arr.dtype}, shape {arr.shape}: want float (D,)")
    return torch.from_numpy(arr.astype(np.float16))


def decode_vectors(buf: bytes, spans: list[tuple[int, int]]) -> torch.Tensor:
    """The float16 (D,) .npy files at (offset, size) `spans` of `buf` -> float16 (N, D), in
    one gather when they all carry np.save's header of one shape (what ShardWriter writes),
    else one by one (decode_vector)."""
    starts = np.array([s for s, _ in spans], dtype=np.int64)
    s0, n0 = spans[0]
    head = 10 + int.from_bytes(buf[s0 + 8 : s0 + 10], "little")
    m = _HEADER.match(buf[s0 : s0 + head], 10) if buf[s0 : s0 + 8] == b"\x93NUMPY\x01\x00" else None
    header = buf[s0 : s0 + head]
    same = (
        m is not None
        and all(n == n0 for _, n in spans)
        and all(buf[s : s + head] == header for s in starts.tolist())
    )
    if not same or n0 - head != 2 * int(m.group(1)):
        return torch.stack([decode_vector(buf[s : s + n]) for s, n in spans])
    width, raw = n0 - head, np.frombuffer(buf, np.uint8)
    rows = np.empty((len(spans), width), np.uint8)
    for i, s in enumerate((starts + head).tolist()):  # row copies: no (N, width) index array
        rows[i] = raw[s : s + width]
    return torch.from_numpy(rows.view("<f2"))


def decode(raw: dict) -> dict:
    """Raw members -> {"image": float16 (D, 1, 1), "label", "key", "group", "meta"}
    (data.decode_sample)."""
    label = int(raw["cls"].decode("ascii").strip()) if "cls" in raw else -1
    meta = json.loads(raw["json"].decode("utf-8")) if "json" in raw else {}
    vec = decode_vector(raw[MEMBER])
    return {"image": vec.view(-1, 1, 1), "label": label, "key": raw["__key__"],
            "group": meta.get("group"), "meta": meta}  # fmt: skip


def tile_meta(meta: dict | None) -> dict:
    """What an embedding sample's JSON keeps of its image sample's: the group, and the
    TILE_FIELDS the tile has (none for an ordinary patch)."""
    meta = meta or {}
    return {"group": meta.get("group"), **{k: meta[k] for k in TILE_FIELDS if k in meta}}


class ShardWriter:
    """Appends embedding samples to an open tar file (reproducible headers) and records the
    run of each slide's samples: `runs`, in order, [{"slide", "start", "count", "offset",
    "bytes", "labels"}] with `start` the sample index in the shard, `offset` and `bytes` the
    byte range of the run's members (a reader reads it at once) and `labels` the count of
    each tile class (unlabelled tiles not counted). A slide's samples must be consecutive in
    a shard."""

    def __init__(self, tar: tarfile.TarFile, num_classes: int):
        self.tar, self.num_classes = tar, num_classes
        self.count, self.runs = 0, []

    def add(self, key: str, vec: np.ndarray, label: int, meta: dict) -> None:
        """One sample: float (D,) vector, label (-1: none), the JSON to store (tile_meta)."""
        offset = self.tar.offset
        self._member(f"{key}.{MEMBER}", encode(vec))
        if label >= 0:
            self._member(f"{key}.cls", str(label).encode())
        self._member(f"{key}.json", json.dumps(meta).encode())
        if meta.get("slide") is not None:
            self._note(str(meta["slide"]), label, offset, key)
            self.runs[-1]["bytes"] = self.tar.offset - self.runs[-1]["offset"]
        self.count += 1

    def _note(self, slide: str, label: int, offset: int, key: str) -> None:
        last = self.runs[-1] if self.runs else None
        if last is None or last["slide"] != slide or last["start"] + last["count"] != self.count:
            if any(r["slide"] == slide for r in self.runs):
                raise ShardError(
                    f"tile {key}: the tiles of slide {slide} are not consecutive in their "
                    "shard; write each slide's tiles together (histodist.shard --dataset wsi)"
                )
            last = {"slide": slide, "start": self.count, "count": 0, "offset": offset,
                    "labels": [0] * self.num_classes}  # fmt: skip
            self.runs.append(last)
        last["count"] += 1
        if 0 <= label < self.num_classes:
            last["labels"][label] += 1

    def _member(self, name: str, payload: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(payload), 0o444, 0  # reproducible bytes
        self.tar.addfile(info, io.BytesIO(payload))


def identity(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """The augmentation and eval transform of an embedding run: float32, nothing else."""
    return x.float()


def config_overrides(cfg, manifest: dict, where: str) -> dict:
    """Config sections a run on embedding shards fixes: the head's input width, no image
    augmentation, input "size" 1 (the vectors are (D, 1, 1))."""
    from histodist.mil import MIL_HEADS

    if cfg.model.model not in (*HEADS, *MIL_HEADS):
        raise EmbeddingError(
            f"{where} holds embeddings of {manifest['embedding']['model']}: train a head on "
            f"them with --model linear or --model mlp, or a MIL head on slide bags "
            f"({', '.join(MIL_HEADS)}) (not {cfg.model.model})"
        )
    dim = int(manifest["embedding"]["dim"])
    if cfg.model.embed_dim and cfg.model.embed_dim != dim:
        raise EmbeddingError(f"--embed-dim {cfg.model.embed_dim}: {where} holds {dim}-d vectors")
    return {
        "data": {"image_size": 1},
        "model": {"embed_dim": dim, "channels_last": False},
        "augment": {"augment": "none", "crop": 1.0},
        "log": {"log_images": False},
    }


def check_compatible(run_manifest: dict, shards_manifest: dict, shards: str) -> None:
    """An embedding run reads only embeddings of the same weights and preprocessing; an image
    run reads no embeddings. Raises EmbeddingError naming the fix."""
    run_emb, emb = run_manifest.get("embedding"), shards_manifest.get("embedding")
    if run_emb is None and emb is None:
        return
    if run_emb is None:
        raise EmbeddingError(
            f"{shards}: embedding shards ({emb['model']}), but the run was trained on images; "
            "pass image shards"
        )
    if emb is None:
        raise EmbeddingError(
            f"{shards}: image shards, but the run is a head on {run_emb['model']} embeddings; "
            f"embed them first: python -m histodist.embed --model {run_emb['model']} "
            f"--shards {shards} --out EMB, then pass --shards EMB"
        )
    for key in ("weights_sha256", "preprocessing", "dim"):
        if run_emb.get(key) != emb.get(key):
            raise EmbeddingError(
                f"{shards}: embeddings of {emb['model']} ({key} {emb.get(key)}) differ from the "
                f"run's {run_emb['model']} ({run_emb.get(key)}); embed with the run's model"
            )
