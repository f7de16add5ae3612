"""The kernel account and the GPU build, run from the repository root.

    python -m tools.gpu_build --account   exact bytes and tl.dot FLOPs of every Triton kernel, counted in
                                          Triton's interpreter, beside floors, SDPA / eager models and H100
                                          bounds (account.json, account.md)
    python -m tools.gpu_build --build     every kernel variant compiled for sm_80 / sm_90 / sm_100 without a
                                          GPU: registers, spills, shared memory, tensor cores, occupancy
                                          (gpu_build.json, gpu_build.md)

Both may be given (the account runs first). --out DIR writes the files into DIR; the Markdown is
printed either way. --smoke runs a seconds-long version: the account at H = 3, N = 197; the build in
float16, d = 64, one shape, the first candidate the prune keeps. The account needs the interpreter on
before Triton defines the kernels: without TRITON_INTERPRET=1 it runs itself again in a subprocess
with it. The committed reports are benchmarks/results/account.md and gpu_build.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from tools.gpu_build.child import child_env

PROG = "python -m tools.gpu_build"
SMOKE_SHAPES = "3:197"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--account", action="store_true", help="the kernel account")
    p.add_argument("--build", action="store_true", help="the GPU build")
    p.add_argument("--out", default=None, help="folder for the JSON and Markdown (printed only if omitted)")
    p.add_argument("--smoke", action="store_true", help="tiny version of each (seconds; for CI)")
    p.add_argument("--shapes", default=None,
                   help=f"account: H:N pairs, comma-separated (default: the 16 standard shapes; {SMOKE_SHAPES} with --smoke)")
    p.add_argument("--batch", type=int, default=1, help="account: the batch that is run (counts are per image)")
    p.add_argument("--archs", default=None, help="build: comma-separated targets (default: sm_80,sm_90,sm_100)")
    p.add_argument("--workers", type=int, default=None, help="build: compile processes (default: up to 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def emit(out: str | None, stem: str, result: dict, md: str) -> None:
    """Print the Markdown; with ``out``, write ``<stem>.json`` and ``<stem>.md`` there."""
    from pruneattn.bench.report import write_json

    print(md)
    if out:
        os.makedirs(out, exist_ok=True)
        write_json(os.path.join(out, f"{stem}.json"), result)
        with open(os.path.join(out, f"{stem}.md"), "w", encoding="utf-8") as f:
            f.write(md)
        print(f"wrote {out}/{stem}.json and {stem}.md")


def account(args: argparse.Namespace) -> int:
    """The kernel account, in this process if the interpreter is on, else in a subprocess with it on."""
    from pruneattn.backend import interpreting
    from tools.gpu_build.hooks import check_interpreter_ok

    if not interpreting() or ("pruneattn.kernels.attention" in sys.modules and not check_interpreter_ok()):
        argv = ["--account", "--batch", str(args.batch), *(["--out", args.out] if args.out else []),
                *(["--shapes", args.shapes] if args.shapes else []), *(["--smoke"] if args.smoke else []),
                *(["--no-progress"] if args.no_progress else [])]
        return subprocess.call([sys.executable, "-m", "tools.gpu_build", *argv], env=child_env(interpret=True))
    from tools.gpu_build.account import STANDARD_SHAPES, run_account
    from tools.gpu_build.report import markdown

    spec = args.shapes or (SMOKE_SHAPES if args.smoke else None)
    shapes = tuple(tuple(int(x) for x in s.split(":")) for s in spec.split(",")) if spec else STANDARD_SHAPES
    result = run_account(shapes, B=args.batch, progress=not args.no_progress)
    emit(args.out, "account", result, markdown(result))
    return 0


def build(args: argparse.Namespace) -> int:
    """The GPU build; exit status 2 where this machine has no GPU toolchain."""
    from tools.gpu_build import suite
    from tools.gpu_build.build import toolchain
    from tools.gpu_build.report import build_markdown

    tools = toolchain()
    if "missing" in tools:
        print(f"{PROG} --build: cannot build for a GPU here: {tools['missing']}", file=sys.stderr)
        return 2
    archs = tuple(args.archs.split(",")) if args.archs else suite.ARCH_NAMES
    result = suite.run_build(smoke=args.smoke, archs=archs, workers=args.workers, progress=not args.no_progress)
    emit(args.out, "gpu_build", result, build_markdown(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not (args.account or args.build):
        p.error("give --account, --build or both")
    rc = account(args) if args.account else 0
    if rc == 0 and args.build:
        rc = build(args)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
