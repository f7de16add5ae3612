"""``pruneattn`` command line: ``pruneattn demo`` and ``pruneattn bench``."""
from __future__ import annotations

import argparse
import importlib
import sys


def plain(text: str) -> str:
    """Docstring text as a terminal shows it: without the double back-ticks that mark code."""
    return text.replace("``", "")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout and shows each option's default, except for flags and None defaults
    and where the help text already names the default; drops the docstrings' code marks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action)

    def format_help(self) -> str:
        return plain(super().format_help())


COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pruneattn.fashion_mnist.demo",
             "prune a small ViT on Fashion-MNIST images: accuracy, speed and a picture of the kept patches"),
    "bench": ("pruneattn.bench", "benchmarks of the kernels, the CPU path and whole models"),
}


def usage() -> str:
    """The text of ``pruneattn --help``."""
    from pruneattn import __version__

    width = max(len(c) for c in COMMANDS)
    lines = ["usage: pruneattn [-h] [--version] COMMAND [options]",
             "",
             f"pruneattn {__version__}: attention-diversity token pruning for vision transformers.",
             "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "options:", "  -h, --help  show this message and exit", "  --version   show the version and exit",
              "", "Run 'pruneattn COMMAND --help' for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a command's ``main``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--version":
        from pruneattn import __version__

        print(f"pruneattn {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr)
        print(f"\npruneattn: error: unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    return int(importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
