"""Package version plus the git SHA of the source tree, stored with every run and manifest."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

from histodist import __version__


@functools.cache
def version_string() -> str:
    """`0.1.0` or `0.1.0+g<sha>[.dirty]` when running from a git checkout."""
    root = str(Path(__file__).resolve().parent.parent)

    def git(*args: str) -> str:
        run = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                             timeout=5, check=True)  # fmt: skip
        return run.stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{sha}" + (".dirty" if dirty else "")
