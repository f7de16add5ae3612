"""``pruneattn`` command line: ``pruneattn demo`` (the main job) and ``pruneattn bench``."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"demo": "pruneattn.demo", "bench": "pruneattn.bench"}
    if not argv or argv[0] not in commands:
        print("usage: pruneattn {demo,bench} [options]   (pruneattn COMMAND --help for options)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    return int(importlib.import_module(commands[argv[0]]).main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
