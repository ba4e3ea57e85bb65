"""Embedding shards: one float16 vector per sample, written by `histodist.embed`.

An embedding set is a shard folder (docs/shards.md) whose manifest has `"kind": "embeddings"`
and an `"embedding"` block (model, weights sha256, hub revision, preprocessing, dimension).
Each sample is `<key>.emb.npy` (float16 (D,), a plain .npy file), `<key>.cls` and `<key>.json`
(`{"group": ...}`). The training loader decodes a vector as a (D, 1, 1) float16 "image", so
batches, the loop, checkpoints and inference need no other path; the head flattens it.
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
import torch

from histodist.config import ConfigError

MEMBER = "emb.npy"
KIND = "embeddings"
HEADS = ("linear", "mlp")
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


def decode(raw: dict) -> dict:
    """Raw members -> {"image": float16 (D, 1, 1), "label", "key", "group"} (data.decode_sample)."""
    label = int(raw["cls"].decode("ascii").strip()) if "cls" in raw else -1
    meta = json.loads(raw["json"].decode("utf-8")) if "json" in raw else {}
    vec = decode_vector(raw[MEMBER])
    return {"image": vec.view(-1, 1, 1), "label": label, "key": raw["__key__"],
            "group": meta.get("group")}  # fmt: skip


def identity(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """The augmentation and eval transform of an embedding run: float32, nothing else."""
    return x.float()


def config_overrides(cfg, manifest: dict, where: str) -> dict:
    """Config sections a run on embedding shards fixes: the head's input width, no image
    augmentation, input "size" 1 (the vectors are (D, 1, 1))."""
    if cfg.model.model not in HEADS:
        raise EmbeddingError(
            f"{where} holds embeddings of {manifest['embedding']['model']}: train a head on "
            f"them with --model linear or --model mlp (not {cfg.model.model})"
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
