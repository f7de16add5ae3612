"""``pruneattn bench --account`` / ``--build``: the static suites' command line."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from pruneattn.bench.static.account import STANDARD_SHAPES, run_account
from pruneattn.bench.static.hooks import check_interpreter_ok
from pruneattn.bench.static.report import markdown


def _reexec(argv: list[str]) -> int:
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "import sys; from pruneattn.bench.static.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.call([sys.executable, "-c", code, *argv], env=env)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pruneattn bench --account", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="folder for account.json and account.md (printed only if omitted)")
    p.add_argument("--shapes", default=None, help="H:N pairs, comma-separated (default: the 16 standard shapes)")
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    from pruneattn._env import interpreting

    if not interpreting() or ("pruneattn.kernels.attention" in sys.modules and not check_interpreter_ok()):
        return _reexec(list(argv or []))
    shapes = STANDARD_SHAPES
    if args.shapes:
        shapes = tuple(tuple(int(x) for x in s.split(":")) for s in args.shapes.split(","))
    result = run_account(shapes, B=args.batch)
    _emit(args.out, "account", result, markdown(result))
    return 0


def _emit(out: str | None, stem: str, result: dict, md: str) -> None:
    """Print the Markdown; with ``out``, write ``<stem>.json`` and ``<stem>.md`` there."""
    from pruneattn.bench.report import write_json

    print(md)
    if out:
        os.makedirs(out, exist_ok=True)
        write_json(os.path.join(out, f"{stem}.json"), result)
        with open(os.path.join(out, f"{stem}.md"), "w", encoding="utf-8") as f:
            f.write(md)
        print(f"wrote {out}/{stem}.json and {stem}.md")


def build_main(argv: list[str] | None = None) -> int:
    """``pruneattn bench --build``: compile every kernel variant for GPU targets, without a GPU."""
    from pruneattn.bench.static import suite
    from pruneattn.bench.static.build import toolchain
    from pruneattn.bench.static.report import build_markdown

    p = argparse.ArgumentParser(prog="pruneattn bench --build", description=build_main.__doc__)
    p.add_argument("--out", default=None, help="folder for gpu_build.json and gpu_build.md (printed only if omitted)")
    p.add_argument("--smoke", action="store_true", help="float16, d = 64, one shape, first candidate only")
    p.add_argument("--archs", default=",".join(suite.ARCH_NAMES), help="comma-separated targets")
    p.add_argument("--workers", type=int, default=None, help="compile processes (default: up to 4)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = p.parse_args(argv)
    tools = toolchain()
    if "missing" in tools:
        print(f"pruneattn bench --build: cannot build for a GPU here: {tools['missing']}", file=sys.stderr)
        return 2
    result = suite.run_build(smoke=args.smoke, archs=tuple(args.archs.split(",")), workers=args.workers,
                             progress=not args.no_progress)
    _emit(args.out, "gpu_build", result, build_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
