"""Download the official PatchCamelyon release: resumable (HTTP Range), MD5-checked.

    python -m histodist.shard --dataset pcam --download [--cache-dir DIR] --out shards/pcam

Files and MD5 sums are those of the PCam release (github.com/basveeling/pcam, Zenodo record
2546921). The README's table swaps the valid and test sums (basveeling/pcam issues #1 and #4;
torchvision fixed the same in pytorch/vision#6644); the sums below are the files' real ones.
The URL base can be overridden (`--url-base` or env HISTODIST_PCAM_URL) for a mirror or a test
server; files are fetched as `<base>/<name>`.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from histodist.errors import HistodistError
from histodist.fileio import file_digest

ZENODO = "https://zenodo.org/records/2546921/files"
PCAM_FILES = {
    "camelyonpatch_level_2_split_train_x.h5.gz": "1571f514728f59376b705fc836ff4b63",
    "camelyonpatch_level_2_split_train_y.h5.gz": "35c2d7259d906cfc8143347bb8e05be7",
    "camelyonpatch_level_2_split_valid_x.h5.gz": "d5b63470df7cfa627aeec8b9dc0c066e",
    "camelyonpatch_level_2_split_valid_y.h5.gz": "2b85f58b927af9964a4c15b8f7e8f179",
    "camelyonpatch_level_2_split_test_x.h5.gz": "d8c2d60d490dbd479f8199bdfa0cf6ec",
    "camelyonpatch_level_2_split_test_y.h5.gz": "60a7035772fbdb7f34eb86d4420cf66a",
    "camelyonpatch_level_2_split_train_meta.csv": "5a3dd671e465cfd74b5b822125e65b0a",
    "camelyonpatch_level_2_split_valid_meta.csv": "67589e00a4a37ec317f2d1932c7502ca",
    "camelyonpatch_level_2_split_test_meta.csv": "3455fd69135b66734e1008f3af684566",
}


class DownloadError(HistodistError, RuntimeError):
    """Network failure or checksum mismatch; the message says what to do."""


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "histodist" / "pcam"


def fetch_pcam(
    dest: str | Path | None = None, url_base: str | None = None, *, timeout: float = 30.0
) -> Path:
    """Download every missing or bad PCam file into `dest`; returns `dest`."""
    dest = Path(dest) if dest else default_cache()
    dest.mkdir(parents=True, exist_ok=True)
    base = (url_base or os.environ.get("HISTODIST_PCAM_URL") or ZENODO).rstrip("/")
    for name, md5 in PCAM_FILES.items():
        path = dest / name
        if path.is_file() and file_digest(path, "md5") == md5:
            continue
        if name.endswith(".gz") and (dest / name[: -len(".gz")]).is_file():
            continue  # already gunzipped (by hand or by an earlier run): nothing to fetch
        url = f"{base}/{name}" + ("?download=1" if base == ZENODO else "")
        download(url, path, md5, timeout=timeout)
    return dest


def download(url: str, path: Path, md5: str, *, timeout: float = 30.0) -> None:
    """Fetch `url` to `path` through `<path>.part`, resuming a partial file; check the MD5."""
    part = path.with_name(path.name + ".part")
    start = part.stat().st_size if part.is_file() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416:  # 416: the partial file is already whole
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(
            f"cannot reach {url} ({reason}); offline? download the PCam files by hand "
            f"(github.com/basveeling/pcam lists them) into {path.parent} with their official "
            f"names, then run --dataset pcam --src {path.parent}"
        ) from e
    else:
        with resp:
            if start and resp.status != 206:  # server ignored the Range header: start over
                start = 0
            _stream(resp, part, start, name=path.name)
    got = file_digest(part, "md5")
    if got != md5:
        part.unlink()
        raise DownloadError(
            f"{path.name}: MD5 {got}, expected {md5}; the bad file was "
            "deleted, run the command again to download it afresh"
        )
    os.replace(part, path)


def _stream(resp, part: Path, start: int, *, name: str) -> None:
    length = resp.headers.get("Content-Length")
    total = start + int(length) if length else None
    with (
        open(part, "ab" if start else "wb") as f,
        tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=name, leave=False) as bar,
    ):
        while chunk := resp.read(1 << 20):
            f.write(chunk)
            bar.update(len(chunk))
