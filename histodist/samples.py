"""The small real samples a histodist checkout carries in `examples/` (not in the wheel).

    samples.find("pcam-mini")          # Path of <checkout>/examples/pcam-mini, or None
    samples.pcam_mini_command("shards/pcam-mini")
    # 'python -m histodist.shard --dataset folder --src examples/pcam-mini --out shards/pcam-mini'

`pcam-mini`: 1,000 PatchCamelyon patches (train 400 + 400, valid 100 + 100, folder layout);
`kaggle-hcd-mini`: 15 Kaggle HCD tifs. Both CC0; examples/*/README.md says where they come
from. Imports only the standard library.
"""

from __future__ import annotations

from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = ("pcam-mini", "kaggle-hcd-mini")


def find(name: str) -> Path | None:
    """The sample folder `name` (one of NAMES) of this checkout, or None where histodist was
    installed from a wheel (the samples are not packaged)."""
    if name not in NAMES:
        raise ValueError(f"unknown sample {name!r}; known: {', '.join(NAMES)}")
    path = EXAMPLES / name
    return path if path.is_dir() else None


def shown(path: Path) -> str:
    """`path` as a user would type it here: relative to the working directory when inside it."""
    cwd = Path.cwd()
    return path.relative_to(cwd).as_posix() if path.is_relative_to(cwd) else str(path)


TEAM_PCAM = "../shared/data/pcam-jpeg"  # the team's 23,000-patch copy beside a checkout


def bench_images(sub: str = "") -> str:
    """The benchmarks' default images (a pcam-jpeg style folder, or its `sub` folder): the
    team's copy beside the working directory where there is one, else the bundled pcam-mini,
    so that a fresh clone anywhere runs them (on 1,000 images, not 23,000)."""
    team = Path(TEAM_PCAM, sub)
    sample = find("pcam-mini")
    if team.is_dir() or sample is None:
        return team.as_posix()
    return shown(sample / sub)


def pcam_mini_command(out: str) -> str:
    """The command that shards the bundled PCam sample into `out`."""
    src = find("pcam-mini")
    where = shown(src) if src else "examples/pcam-mini"
    return f"python -m histodist.shard --dataset folder --src {where} --out {out}"
