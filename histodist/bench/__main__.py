"""`python -m histodist.bench SUITE [options]`: dispatch to histodist.bench.SUITE.main(argv)."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import histodist.bench as bench

# Modules of histodist.bench that hold shared helpers, not a suite.
HELPERS = {"common", "syncs"}


def suites() -> list[str]:
    names = (m.name for m in pkgutil.iter_modules(bench.__path__))
    return sorted(n for n in names if not n.startswith("_") and n not in HELPERS)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = suites()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in names:
        print(f"usage: python -m histodist.bench {{{','.join(names)}}} [options]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return importlib.import_module(f"histodist.bench.{argv[0]}").main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
