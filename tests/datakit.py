"""Where the tests' real images come from.

    real_data("pcam-jpeg", "pcam-mini")   # ../shared/data/pcam-jpeg if present, else examples/pcam-mini
    first_patches(root, "train", 1, 24)   # the first 24 class-1 train patches (skips if fewer)

The team's full copies live in ../shared/data beside the checkout (pcam-jpeg: 23,000 PCam
patches; kaggle-hcd-mini: 15 Kaggle tifs). A checkout without them (a fresh clone anywhere) uses
the samples in examples/: pcam-mini holds the first 400 train and 100 valid patches of each class
of pcam-jpeg, by file name, so a test taking the first N of a class sees the same images from
either source. HISTODIST_TEST_DATA=sample uses the samples even when ../shared/data is there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
EXAMPLES = ROOT / "examples"


def real_data(shared_name: str, sample_name: str, shared: Path = SHARED_DATA) -> Path:
    """`shared/<shared_name>` when it is a folder (and HISTODIST_TEST_DATA is not `sample`),
    else `examples/<sample_name>`; skips the test, saying why, when neither exists."""
    full = shared / shared_name
    if full.is_dir() and os.environ.get("HISTODIST_TEST_DATA") != "sample":
        return full
    sample = EXAMPLES / sample_name
    if not sample.is_dir():
        pytest.skip(f"real data absent: neither {full} nor {sample}")
    return sample


def first_patches(root: Path, split: str, label: int | str, n: int) -> list[Path]:
    """The first `n` JPEGs of `root/<split>/<label>` by name; skips the test, saying why, when
    the folder holds fewer (the bundled sample is smaller than the full copy)."""
    files = sorted((root / split / str(label)).glob("*.jpg"))
    if len(files) < n:
        pytest.skip(f"needs {n} images in {root / split / str(label)}, which holds "
                    f"{len(files)}: run beside the full copy {SHARED_DATA}")  # fmt: skip
    return files[:n]
