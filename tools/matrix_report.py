"""The version matrix's records (``tools/matrix.sh``): one JSON per environment, and their table.

    python tools/matrix_report.py row --name NAME --junit FILE --seconds S --exit-status RC --out FILE.json
    python tools/matrix_report.py refusal --out FILE.json     (TRITON_INTERPRET=1: a kernel must be refused)
    python tools/matrix_report.py table DIR                   (Markdown of every DIR/*.json, to stdout)

``row`` and ``refusal`` run in the environment they describe (standard library only, apart from the
refusal's kernel call).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "triton", "numpy", "transformers", "timm")
ROWS = ("oldest", "readme", "newest")
# Run in a fresh interpreter with TRITON_INTERPRET=1: one kernel launch on the CPU.
REFUSAL_PROBE = (
    "import torch, pruneattn\n"
    "q = torch.randn(1, 2, 5, 16)\n"
    "pruneattn.attention_scores(q, q, q, stat='var', query='cls', num_prefix=1)\n"
)


def versions() -> dict[str, str | None]:
    """Python and the installed versions of the packages the matrix varies."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def junit_counts(path: Path) -> tuple[dict[str, int], list[str]]:
    """(passed / failed / errors / skipped counts, ids of the tests that failed or errored) of a JUnit XML."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    bad: list[str] = []
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if "failure" in kinds:
            counts["failed"] += 1
            bad.append(name)
        elif "error" in kinds:
            counts["errors"] += 1
            bad.append(name)
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, bad


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def commit() -> str | None:
    """The repository's commit the suite ran on (with "+changes" when the work tree differed)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty else "")


def record_row(args: argparse.Namespace) -> None:
    counts, bad = junit_counts(Path(args.junit))
    row = {
        "name": args.name,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "versions": versions(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU (kernels in Triton's interpreter)"
        if not _has_cuda() else f"{platform.machine()}, {os.cpu_count()} CPUs, CUDA GPU",
        "pytest_workers": int(os.environ.get("MATRIX_JOBS", "2")),
        "load_average_1min": {"start": float(args.load_start) if args.load_start else None, "end": load_average()},
        "exit_status": args.exit_status,
        "wall_seconds": args.seconds,
        **counts,
        "failures": bad,
    }
    Path(args.out).write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {counts}")


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def record_refusal(args: argparse.Namespace) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([sys.executable, "-c", REFUSAL_PROBE], env=env, capture_output=True, text=True)
    last = (res.stderr.strip().splitlines() or [""])[-1]
    refused = res.returncode != 0 and last.startswith("RuntimeError: pruneattn:") and "Fix:" in last
    row = json.loads(Path(args.out).read_text(encoding="utf-8"))
    row["refusal"] = {"versions": versions(), "refused_with_the_fix": refused, "message": last}
    Path(args.out).write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
    print(f"refusal with {row['refusal']['versions']}: {'ok' if refused else 'NOT REFUSED'}\n{last}")
    if not refused:
        raise SystemExit(1)


def _minutes(seconds: int) -> str:
    return f"{seconds // 60} min {seconds % 60:02d} s"


def table(folder: Path) -> str:
    """The Markdown table of the rows recorded in ``folder``."""
    rows = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]
    rows.sort(key=lambda r: ROWS.index(r["name"]) if r["name"] in ROWS else len(ROWS))
    lines = [
        "# Version matrix",
        "",
        "The whole test suite (`python -m pytest -q -n 2`) in a fresh virtual environment per row, made by",
        "`tools/matrix.sh`. Without a GPU the Triton kernels run in Triton's CPU interpreter.",
        "",
        "| environment | Python | torch | triton | numpy | transformers | timm | passed | failed | errors | skipped | wall time | date |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        v = r["versions"]
        lines.append(
            f"| {r['name']} | {v['python']} | {v['torch']} | {v['triton']} | {v['numpy']} | {v['transformers']} | "
            f"{v['timm']} | {r['passed']} | {r['failed']} | {r['errors']} | {r['skipped']} | "
            f"{_minutes(r['wall_seconds'])} | {r['date']} |"
        )
    lines.append("")
    for r in rows:
        load = r["load_average_1min"]
        line = f"- {r['name']}: commit {r.get('commit') or 'unknown'}, {r['machine']}, {r['pytest_workers']} pytest workers"
        if load["start"] is not None and load["end"] is not None:
            line += f", 1-minute load average {load['start']:.2f} at start, {load['end']:.2f} at end"
        lines.append(line)
        for name in r["failures"]:
            lines.append(f"  - failed: `{name}`")
        if "refusal" in r:
            ref, v = r["refusal"], r["refusal"]["versions"]
            verdict = "refused with the fix" if ref["refused_with_the_fix"] else "NOT refused"
            lines.append(f"  - then numpy {v['numpy']} with triton {v['triton']}, a kernel in the interpreter: "
                         f"{verdict}: `{ref['message']}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/matrix_report.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("row", help="record one environment's run")
    r.add_argument("--name", required=True)
    r.add_argument("--junit", required=True)
    r.add_argument("--seconds", type=int, required=True)
    r.add_argument("--exit-status", type=int, required=True)
    r.add_argument("--load-start", default="")
    r.add_argument("--out", required=True)
    f = sub.add_parser("refusal", help="check that Triton's interpreter refuses this environment, with the fix")
    f.add_argument("--out", required=True)
    t = sub.add_parser("table", help="Markdown table of the recorded rows")
    t.add_argument("folder", type=Path)
    args = p.parse_args(argv)
    if args.command == "row":
        record_row(args)
    elif args.command == "refusal":
        record_refusal(args)
    else:
        sys.stdout.write(table(args.folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
