"""Files written whole or not at all, file digests, and the image file extensions and pixel
limit of the images histodist reads. Imports nothing heavy (no torch, numpy or PIL), so every module may use it.

A file is written under a hidden temporary name in its own folder (`.<name>.<random>.tmp`:
the same file system, so the rename is atomic; hidden, so no glob for `*.tar` or `*.png`
ever sees a half-written file), then renamed into place. A reader therefore sees the old file
or the new one, never part of one; a writer that fails leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Image files the raw-layout readers and the inference commands accept (PIL decodes them all).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")

# The most pixels of any image histodist decodes, checked on the header before decoding, by the
# shard writer (histodist.ingest.imageio) and by every shard or file reader (histodist.data.
# loader): PIL's decompression-bomb limit, 2 x PIL.Image.MAX_IMAGE_PIXELS (about 13,400 x
# 13,400), stated here so that no reader depends on PIL's setting. A 30,000 x 30,000 PNG is a
# 2.6 MB file and 2.7 GB of decoded pixels.
MAX_IMAGE_PIXELS = 178_956_970


def check_image_size(width: int, height: int) -> None:
    """Raise ValueError when a width x height image is over MAX_IMAGE_PIXELS."""
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"image of {width} x {height} pixels, over the limit of {MAX_IMAGE_PIXELS:,} "
            "(a decompression bomb?); not decoded"
        )


TMP_SUFFIX = ".tmp"


def temp_of(name: str) -> re.Pattern:
    """A pattern matching the temporary names `atomic_path` uses for a file called `name`."""
    return re.compile(re.escape(f".{name}.") + r"\w+" + re.escape(TMP_SUFFIX))


def sync_to_disk(path: str | os.PathLike) -> None:
    """Flush a file or a folder (its entries) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield an empty temporary file beside `path` for a writer that needs a path (tar,
    safetensors, torch.save, PNG: give the format explicitly, the name ends in `.tmp`). On a
    clean exit the file gets the usual mode (umask) and is renamed to `path`; on an error it
    is removed. `fsync`: flush the file to disk before the rename (checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        if fsync:
            sync_to_disk(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename in (None, name):
            # A writer's own OSError (a full disk mid-write) names no file, or the temporary
            # one: name the file being written, so that the one-line error says which.
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str, *, fsync: bool = False) -> Path:
    """Write `data` (bytes, or text as UTF-8 with no newline translation) to `path` whole
    or not at all (see `atomic_path`). Returns the path."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
    return Path(path)


def file_digest(path: str | os.PathLike, algo: str = "sha256", bufsize: int = 1 << 22) -> str:
    """Hex digest of a file's bytes, read in `bufsize` chunks (constant memory)."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()
