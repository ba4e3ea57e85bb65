"""Builders of tiny raw datasets in their exact official layouts, from real PCam pixels.

Each builder writes under `root` and returns it (or the file `--src` should name). Pixels come
from the `pcam_jpeg` fixture (real H&E patches), cropped or resized to each dataset's size.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
from datakit import first_patches
from PIL import Image


def real_patches(pcam_jpeg: Path, n: int, label: int = 0, split: str = "train") -> list[Path]:
    """The first `n` real 96x96 JPEG patches of one class."""
    return first_patches(pcam_jpeg, split, label, n)


def _rgb(path: Path, size: tuple[int, int] | None = None) -> Image.Image:
    im = Image.open(path).convert("RGB")
    return im.resize(size, Image.BILINEAR) if size else im


def make_folder(root: Path, pcam_jpeg: Path, per_class: int = 4, splits: bool = True) -> Path:
    """`[<split>/]<class>/<name>.jpg` with real JPEG bytes (train + valid, or no split folders)."""
    for split in ("train", "valid") if splits else ("",):
        n = per_class if split != "valid" else max(2, per_class // 2)
        for label in (0, 1):
            d = root / split / str(label)
            d.mkdir(parents=True, exist_ok=True)
            for p in real_patches(pcam_jpeg, n, label, split or "train"):
                shutil.copy(p, d / p.name)
    return root


def make_pcam_h5(
    root: Path, pcam_jpeg: Path, n: dict | None = None, *, gz: bool = False, meta: bool = True
) -> Path:
    """camelyonpatch_level_2_split_{split}_{x,y}.h5[.gz] (+ _meta.csv), official shapes/dtypes."""
    import h5py

    n = n or {"train": 8, "valid": 4, "test": 4}
    root.mkdir(parents=True, exist_ok=True)
    for s_i, (split, count) in enumerate(n.items()):
        half = count // 2  # even counts: alternate class 0 and class 1 rows
        p0, p1 = (real_patches(pcam_jpeg, (s_i + 1) * half, lab)[s_i * half :] for lab in (0, 1))
        paths = [p for pair in zip(p0, p1, strict=True) for p in pair]
        x = np.stack([np.asarray(_rgb(p)) for p in paths]).astype(np.uint8)
        y = np.array([int(p.parent.name) for p in paths], np.uint8).reshape(-1, 1, 1, 1)
        for part, name, arr in (("x", "x", x), ("y", "y", y)):
            path = root / f"camelyonpatch_level_2_split_{split}_{part}.h5"
            with h5py.File(path, "w") as f:
                f.create_dataset(name, data=arr, chunks=(1, *arr.shape[1:]))
            if gz:
                with (
                    open(path, "rb") as fin,
                    gzip.open(f"{path}.gz", "wb", compresslevel=1) as fout,
                ):
                    shutil.copyfileobj(fin, fout)
                path.unlink()
        if meta:
            with open(root / f"camelyonpatch_level_2_split_{split}_meta.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["", "coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi"])
                for i in range(len(paths)):
                    tumour = bool(y[i, 0, 0, 0])
                    w.writerow(
                        [
                            i,
                            1000 + 96 * i,
                            2000,
                            tumour,
                            tumour,
                            f"camelyon16_{split}_slide_{i % 2:03d}",
                        ]
                    )
    return root


def make_kaggle(root: Path, kaggle_mini: Path, test_images: int = 2) -> Path:
    """The real Kaggle files (train/*.tif + train_labels.csv) plus a test/ folder of tifs."""
    shutil.copytree(kaggle_mini, root)
    if test_images:
        (root / "test").mkdir()
        for i, p in enumerate(sorted((root / "train").glob("*.tif"))[:test_images]):
            shutil.copy(p, root / "test" / f"{i:040x}.tif")
    return root


def make_idc(root: Path, pcam_jpeg: Path, patients: int = 6, per_class: int = 2) -> Path:
    """`<patient>/<0|1>/<patient>_idx5_x<X>_y<Y>_class<C>.png`, 50x50 real crops."""
    sources = real_patches(pcam_jpeg, patients * per_class, 0) + real_patches(
        pcam_jpeg, patients * per_class, 1
    )
    k = 0
    for p_i in range(patients):
        patient = str(8863 + p_i * 101)
        for label in (0, 1):
            d = root / patient / str(label)
            d.mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                src = sources[label * patients * per_class + p_i * per_class + j]
                x, y = 51 + 50 * j, 1001 + 50 * k
                _rgb(src).crop((20, 20, 70, 70)).save(
                    d / f"{patient}_idx5_x{x}_y{y}_class{label}.png"
                )
                k += 1
    return root


BREAKHIS_PATIENTS = [  # (B|M, type code, year, patient)
    ("B", "A", 14, "22549AB"),
    ("B", "F", 14, "21998CD"),
    ("B", "PT", 14, "22704"),
    ("B", "TA", 14, "19854C"),
    ("M", "DC", 14, "11031"),
    ("M", "LC", 14, "13412"),
    ("M", "MC", 14, "13418DE"),
    ("M", "PC", 15, "9146"),
]
BREAKHIS_DIRS = {
    "A": "adenosis",
    "F": "fibroadenoma",
    "PT": "phyllodes_tumor",
    "TA": "tubular_adenoma",
    "DC": "ductal_carcinoma",
    "LC": "lobular_carcinoma",
    "MC": "mucinous_carcinoma",
    "PC": "papillary_carcinoma",
}


def make_breakhis(root: Path, pcam_jpeg: Path, mags=("40", "400"), per_mag: int = 1) -> Path:
    """BreaKHis_v1/histology_slides/breast/<benign|malignant>/SOB/<subtype>/<SOB_id>/<MAG>X/...png,
    700x460 PNGs resized from real patches."""
    srcs = real_patches(pcam_jpeg, 4, 0) + real_patches(pcam_jpeg, 4, 1)
    base = root / "BreaKHis_v1" / "histology_slides" / "breast"
    for i, (bm, code, year, patient) in enumerate(BREAKHIS_PATIENTS):
        sob = f"SOB_{bm}_{code}_{year}-{patient}"
        kind = "benign" if bm == "B" else "malignant"
        for mag in mags:
            d = base / kind / "SOB" / BREAKHIS_DIRS[code] / sob / f"{mag}X"
            d.mkdir(parents=True, exist_ok=True)
            for seq in range(1, per_mag + 1):
                name = f"SOB_{bm}_{code}-{year}-{patient}-{mag}-{seq:03d}.png"
                _rgb(srcs[i], (700, 460)).save(d / name, compress_level=1)
    return root


HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def make_ham(root: Path, pcam_jpeg: Path, lesions_per_class: int = 3) -> Path:
    """HAM10000_images_part_{1,2}/ISIC_XXXXXXX.jpg (600x450) + HAM10000_metadata.csv;
    the first lesion of each class has two images."""
    srcs = real_patches(pcam_jpeg, 20, 0) + real_patches(pcam_jpeg, 20, 1)
    rows, image_no = [], 24306
    for c_i, dx in enumerate(HAM_CLASSES):
        for l_i in range(lesions_per_class):
            lesion = f"HAM_{c_i * 100 + l_i:07d}"
            for _ in range(2 if l_i == 0 else 1):
                image_id = f"ISIC_{image_no:07d}"
                part = root / f"HAM10000_images_part_{1 + image_no % 2}"
                part.mkdir(parents=True, exist_ok=True)
                src = srcs[image_no % len(srcs)]
                _rgb(src, (600, 450)).save(part / f"{image_id}.jpg", quality=90)
                rows.append([lesion, image_id, dx, "histo", "50.0", "male", "back"])
                image_no += 1
    with open(root / "HAM10000_metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"])
        w.writerows(rows)
    return root


def make_csv(root: Path, pcam_jpeg: Path, per_class: int = 5) -> Path:
    """images/<name>.jpg + labels.csv with columns images,labels (names, not numbers)."""
    (root / "images").mkdir(parents=True)
    rows = []
    for label, name in ((0, "normal"), (1, "tumor")):
        for p in real_patches(pcam_jpeg, per_class, label):
            shutil.copy(p, root / "images" / p.name)
            rows.append([f"images/{p.name}", name])
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["images", "labels"])
        w.writerows(rows)
    return root / "labels.csv"


def encode(arr: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(arr, mode) if mode else Image.fromarray(arr)
    im.save(buf, format=fmt)
    return buf.getvalue()


def read_split(out: Path, split: str) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} for every sample of a split, read with plain tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    manifest = json.loads((out / "manifest.json").read_text())
    for sh in manifest["splits"][split]["shards"]:
        with tarfile.open(out / sh["name"]) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples
