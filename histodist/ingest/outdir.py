"""What `histodist.shard` (and `histodist.embed --slides`) may replace or delete in its
`--out` folder: only what it wrote.

The writer owns, in `--out`:
- `.shardinfo/`, its records (one per complete shard, written before the shard is renamed
  into place, so a shard file always has its record);
- each `*.tar` with a record there, or listed by the folder's histodist `manifest.json`;
- `manifest.json` when it is a histodist shard manifest, `_info.json` when it is timm's info;
- the temporaries of those files (`.<name>.<random>.tmp`, left by a killed run);
- the whole-slide tiler's working folders: `.slides/` (its per-slide survey cache), `.parts/`
  (per-slide parts of shards being written) and, beside `.slides/`, `qc/` (its QC pictures).
  They are kept across runs (a re-run reuses them), never deleted here.

Everything else is the user's and is never deleted. A folder holding such files is refused
unless `--overwrite` is given; then they are kept, and only a file whose name the run writes
(a shard of the plan, `manifest.json`, `_info.json`) is replaced.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from histodist.errors import UsageError
from histodist.ingest.slides.survey import CACHE_DIR, QC_DIR
from histodist.ingest.writer import INFO_DIR, PARTS_DIR

MANIFEST, INFO = "manifest.json", "_info.json"
_SHARD = r"[A-Za-z0-9_]+-\d{6}\.tar"
# atomic_path's temporaries of the writer's files (histodist.fileio), and the older `<shard>.tmp`
_TEMPORARY = re.compile(rf"\.(?:{_SHARD}|manifest\.json|_info\.json)\.\w+\.tmp|{_SHARD}\.tmp")
_EXAMPLES = 3  # foreign names quoted in the refusal
KEPT = (INFO_DIR, CACHE_DIR, PARTS_DIR, QC_DIR, MANIFEST, INFO)  # owned, never removed as stale


@dataclass
class OutDir:
    """The entries of an output folder, sorted by owner."""

    path: Path
    shards: set[str] = field(default_factory=set)  # shard files the writer wrote
    owned: set[str] = field(default_factory=set)  # every entry the writer wrote, shards included
    foreign: list[str] = field(default_factory=list)  # everything else, sorted


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _manifest_shards(path: Path) -> set[str] | None:
    """Shard names listed by a histodist manifest at `path`, or None when it is not one."""
    m = _read_json(path)
    if not (isinstance(m, dict) and str(m.get("format", "")).startswith("histodist-shards/")):
        return None
    splits = m.get("splits") if isinstance(m.get("splits"), dict) else {}
    return {
        e["name"]
        for s in splits.values()
        if isinstance(s, dict) and isinstance(s.get("shards"), list)
        for e in s["shards"]
        if isinstance(e, dict) and isinstance(e.get("name"), str)
    }


def survey(out: Path) -> OutDir:
    """Sort the entries of `out` (which may not exist yet) into the writer's and the rest."""
    found = OutDir(Path(out))
    if not found.path.is_dir():
        return found
    names = {p.name for p in found.path.iterdir()}
    recorded = {n for n in names if (found.path / INFO_DIR / f"{n}.json").is_file()}
    listed = _manifest_shards(found.path / MANIFEST) if MANIFEST in names else None
    found.shards = {n for n in names if n.endswith(".tar") and n in recorded | (listed or set())}
    info = _read_json(found.path / INFO) if INFO in names else None
    found.owned = found.shards | {n for n in names if _TEMPORARY.fullmatch(n)}
    found.owned |= {INFO_DIR, CACHE_DIR, PARTS_DIR} & names
    if CACHE_DIR in names and QC_DIR in names:  # the tiler writes both
        found.owned.add(QC_DIR)
    if listed is not None:
        found.owned.add(MANIFEST)
    if isinstance(info, dict) and set(info) == {"name", "splits"}:
        found.owned.add(INFO)
    found.foreign = sorted(names - found.owned)
    return found


def claim(out: Path, overwrite: bool) -> OutDir:
    """The survey of `out`; raises UsageError when it holds files the writer did not write
    and `overwrite` is off. Reads only: nothing is deleted or written here."""
    found = survey(out)
    if found.foreign and not overwrite:
        shown = ", ".join(found.foreign[:_EXAMPLES]) + (", ..." if len(found.foreign) > 3 else "")
        raise UsageError(
            f"--out {out}: holds {len(found.foreign)} file(s) histodist.shard did not write "
            f"({shown}); choose an empty or new folder, or pass --overwrite to write beside "
            "them (they are kept; only files named like this run's shards, manifest.json or "
            "_info.json are replaced)"
        )
    return found


def start(found: OutDir) -> None:
    """Before writing: remove the writer's manifest and info file, so that an interrupted run
    never looks complete (a foreign file of those names is left until it is replaced)."""
    for name in (MANIFEST, INFO):
        if name in found.owned:
            (found.path / name).unlink(missing_ok=True)


def remove_stale(found: OutDir, keep: set[str]) -> None:
    """After writing: delete the writer's shards of an earlier plan (and their records) and
    its temporaries; `keep` are this run's shard names. Nothing foreign is touched."""
    for name in sorted(found.owned - keep - set(KEPT)):
        (found.path / name).unlink(missing_ok=True)
        if name in found.shards:
            (found.path / INFO_DIR / f"{name}.json").unlink(missing_ok=True)
    records = found.path / INFO_DIR
    for rec in records.iterdir() if records.is_dir() else ():
        if rec.name.endswith(".tmp") or (rec.suffix == ".json" and rec.stem not in keep):
            rec.unlink(missing_ok=True)  # records of shards gone, temporaries of records
