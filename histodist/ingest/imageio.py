"""Decode, check, convert and encode one image for a shard (runs in the shard writer workers).

Every image is fully decoded (PIL `load()`), so corrupt or truncated files are caught before they
reach a shard. Already-encoded 8-bit RGB images keep their original bytes; grayscale, RGBA,
palette, 16-bit and other modes are converted to 8-bit RGB and re-encoded losslessly as PNG.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from histodist.errors import HistodistError
from histodist.fileio import check_image_size

ENCODINGS = ("auto", "original", "png", "jpeg", "raw")
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "TIFF": "tif", "BMP": "bmp", "WEBP": "webp"}
CONVERSIONS = ("grayscale", "rgba", "palette", "16bit", "other")


class DecodeError(HistodistError, ValueError):
    """The image cannot be decoded (corrupt, truncated, not an image, wrong array shape)."""


@dataclass
class Encoded:
    """A shard-ready image: `data` stored as `<key>.<ext>`, `pixels` uint8 (H, W, 3)."""

    data: bytes
    ext: str
    pixels: np.ndarray
    converted: str | None = None  # which CONVERSIONS entry applied, if any


def prepare(payload: bytes | np.ndarray, encoding: str = "auto", quality: int = 95) -> Encoded:
    """Decode `payload` (encoded bytes or a uint8 (H, W, 3) array) and encode it for a shard.

    `auto`/`original` keep the bytes of 8-bit RGB sources and store arrays as PNG; `png`, `jpeg`
    (at `quality`) and `raw` (`.npy`) re-encode everything. Raises DecodeError.
    """
    if isinstance(payload, np.ndarray):
        if payload.dtype != np.uint8 or payload.ndim != 3 or payload.shape[2] != 3:
            raise DecodeError(f"array of {payload.dtype} {payload.shape}, expected uint8 (H, W, 3)")
        pixels = np.ascontiguousarray(payload)
        # Arrays (PCam HDF5) default to PNG. `python -m histodist.bench shard` (2-core CPU):
        # 25.6 kB per sample in the tar against 30.8 kB for raw .npy (-17%: 6.7 vs 8.1 GB for
        # PCam train), lossless, and the shards must load with timm's `wds/` reader, which
        # decodes jpg/png/webp members but not .npy. PNG decodes ~10x slower than raw
        # (~2k vs ~20k img/s per core), so `--encoding raw` is the choice when the loader's
        # CPU cores, not the GPU, limit training and timm compatibility is not needed.
        return Encoded(
            *encode(pixels, "png" if encoding in ("auto", "original") else encoding, quality),
            pixels,
        )
    im = decode(payload)
    kind = conversion(im, payload)
    if kind is not None:
        pixels = to_rgb8(im)
        target = "png" if encoding in ("auto", "original") else encoding
        return Encoded(*encode(pixels, target, quality), pixels, kind)
    pixels = np.asarray(im)
    if encoding in ("auto", "original"):
        return Encoded(payload, FORMAT_EXT[im.format], pixels)
    return Encoded(*encode(pixels, encoding, quality), pixels)


def decode(data: bytes) -> Image.Image:
    """Open and fully decode `data`; raises DecodeError with PIL's reason, or before decoding
    when the header's size is over fileio.MAX_IMAGE_PIXELS."""
    try:
        im = Image.open(io.BytesIO(data))  # reads the header only
        check_image_size(*im.size)
        im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise DecodeError(str(e).splitlines()[0] if str(e) else type(e).__name__) from e
    return im


def conversion(im: Image.Image, data: bytes) -> str | None:
    """Which conversion an image needs to become 8-bit RGB in a kept format, or None."""
    if im.mode in ("1", "L", "LA"):
        return "grayscale"
    if im.mode in ("P", "PA"):
        return "palette"
    if im.mode == "RGBA":
        return "rgba"
    if im.mode.startswith("I") or im.mode == "F" or _png_bit_depth(data) == 16:
        return "16bit"  # Pillow opens 48-bit RGB PNGs as 8-bit "RGB": the header tells
    if im.mode != "RGB" or im.format not in FORMAT_EXT:
        return "other"
    return None


def _png_bit_depth(data: bytes) -> int | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return data[24]
    return None


def to_rgb8(im: Image.Image) -> np.ndarray:
    """uint8 (H, W, 3): 16-bit values keep their high byte; transparency is composited on white."""
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im)
        a = (a >> 8) if a.max() > 255 else a  # 16-bit data; 'I' images holding 8-bit values stay
        a = np.clip(a, 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(im.convert("RGB"))


def encode(pixels: np.ndarray, encoding: str, quality: int = 95) -> tuple[bytes, str]:
    """Encode uint8 (H, W, 3) pixels: ("png" | "jpeg" | "raw") -> (bytes, member extension)."""
    buf = io.BytesIO()
    if encoding == "raw":
        np.save(buf, pixels, allow_pickle=False)
        return buf.getvalue(), "npy"
    if encoding == "png":
        # compress_level 1: on H&E patches no bigger than the default 6 (22.6 vs 23.6 kB), 25% faster
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
        return buf.getvalue(), "png"
    if encoding == "jpeg":
        Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
        return buf.getvalue(), "jpg"
    raise ValueError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
