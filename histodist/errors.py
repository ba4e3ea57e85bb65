"""The base of every expected error, the exit codes, and the runner every command uses.

An expected error is one a user can fix: its message names the file, flag or run and says
the fix. Every command runs its body through `run_cli`, which turns one into a single line
`histodist.<cmd>: error: ...` on stderr and the documented exit code, with no traceback.
Anything else is a bug and keeps its traceback, except a full disk (ENOSPC, EDQUOT: never a
bug, wherever the write was), which is one line naming the file too. Imports only the standard
library, so a command answers a bad flag before torch loads.

Exit codes (docs/architecture.md):
  0  success
  1  runtime failure: unreadable shards or inputs, a checkpoint that cannot be written, ...
  2  usage or configuration error: a bad flag or value, a run folder the options cannot use
     (argparse's own errors exit 2 as well)
  3  training diverged: a NaN/inf loss for --max-bad-steps consecutive steps
"""

from __future__ import annotations

import argparse
import errno
import math
import sys
from collections.abc import Callable

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_DIVERGED = 0, 1, 2, 3
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class HistodistError(Exception):
    """An expected failure with a message that names what is wrong and the fix."""

    exit_code = EXIT_FAILURE


class UsageError(HistodistError):
    """Options that cannot work together or with the data or run folder they name."""

    exit_code = EXIT_USAGE


def run_cli(
    prog: str,
    fn: Callable[..., int],
    *args,
    extra: tuple = (),
    disk_full: str = "free space, then run the command again",
) -> int:
    """Return `fn(*args)`; a HistodistError (or one of `extra`, e.g. OSError for a command
    whose every file error is the user's) becomes one line on stderr and its exit code. A full
    disk becomes one line naming the file (fileio.atomic_path names it) and `disk_full`, the
    fix, with exit code 1."""
    try:
        return fn(*args)
    except (HistodistError, *extra) as e:
        return _say(prog, str(e), getattr(e, "exit_code", EXIT_FAILURE))
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        what = e.strerror or "no space left on device"
        return _say(prog, f"{e.filename or 'a file'}: {what}; {disk_full}", EXIT_FAILURE)


def integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse `type`: a whole number in [minimum, maximum], else argparse's one-line
    error (exit 2)."""

    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise argparse.ArgumentTypeError(f"{value}: must be {bound}")
        return value

    return whole


def positive(text: str) -> float:
    """An argparse `type`: a finite number > 0, else argparse's one-line error (exit 2)."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be > 0")
    return value


def fraction(text: str) -> float:
    """An argparse `type`: a number in [0, 1], else argparse's one-line error (exit 2)."""
    value = _finite(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: must be in [0, 1]")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text}: must be a finite number")
    return value


def command() -> str:
    """The running command's name, `histodist.<cmd>` for `python -m histodist.<cmd>` (also
    under accelerate launch, torchrun or srun), else `histodist`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", "") or ""
    return name if name.startswith("histodist.") else "histodist"


def warn(message: str) -> None:
    """One warning line on stderr, `histodist.<cmd>: warning: ...`, named after the running
    command: code shared by several commands (the slide tiler runs in shard and embed) says
    which one is speaking."""
    _line(f"{command()}: warning:", message)


def _say(prog: str, message: str, code: int) -> int:
    _line(f"histodist.{prog}: error:", message)
    return code


def _line(prefix: str, message: str) -> None:
    # One line (the message's newlines and runs of spaces collapsed), in one write (print
    # writes the newline apart): ranks that share a log and fail together must not interleave.
    sys.stderr.write(f"{prefix} {' '.join(message.split())}\n")
    sys.stderr.flush()
