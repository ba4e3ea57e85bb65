"""Read side: shards -> uint8 batches for one rank.

remote.py      open local paths, file://, http(s):// and pipe: URLs as streams
tarstream.py   the streaming tar reader
epoch_plan.py  which samples every rank and loader worker reads in a training epoch
loader.py      the per-rank loader (train_loader, eval_loader, from_urls, to_device, ...)
workers.py     its DataLoader worker processes: the signals they ignore, how they always end
embeddings.py  the embedding-shard format written by `histodist.embed`

The loader's public names are reachable here too (`from histodist import data;
data.train_loader(...)`). They load on first use: the loader imports torch and webdataset, and
`histodist.data.remote` or `histodist.data.epoch_plan` alone must stay light for the CLIs' --help.
"""

from __future__ import annotations

import importlib

_SUBMODULES = frozenset({"remote", "tarstream", "epoch_plan", "loader", "embeddings", "workers"})


def __getattr__(name: str):
    """Forward a public name to histodist.data.loader; submodules import as usual."""
    if name.startswith("_") or name in _SUBMODULES:
        raise AttributeError(f"module 'histodist.data' has no attribute {name!r}")
    return getattr(importlib.import_module("histodist.data.loader"), name)
