"""Conformance with other projects' tests: transformers' and timm's own model tests, run on models that
pruneattn patches at keep rate 1.0, against the same tests unpatched.

Run it before a release, from the repository root (like ``tools/matrix.sh``; not part of CI):

    python tools/conformance.py                      # every suite below (about an hour on 2 CPU cores)
    python tools/conformance.py --only timm --workers 2
    python tools/conformance.py --suite vit --suite deit
    python tools/conformance.py --suite llava --update   # after a fix: rerun one suite, keep the others
    python tools/conformance.py --transformers-source DIR_OR_TAR_GZ --common-from-sdist

Each test file runs twice in a subprocess, with ``tools/conformance_plugin.py`` loaded: once as it is and
once with every model it builds patched (``pruneattn.patch(model, keep_rate=1.0)`` for every class that
pruneattn supports). A test that passes unpatched but fails (or errors) patched is a patched-only failure;
``docs/conformance.md`` gives the reason of each one that is left. The script writes
``benchmarks/results/conformance/conformance.json`` and ``conformance.md`` (versions, date, machine,
per-file counts, every patched-only failure with its message).

Where the test files come from (never committed here; unpacked into ``--cache``, by default
``~/.cache/pruneattn-conformance``, outside the repository):

- timm: its PyPI source distribution carries ``tests/`` (``pip download --no-binary :all: --no-deps
  timm==<installed>``).
- transformers: its PyPI source distribution carries only ``tests/*.py`` (the shared test mixins), not
  ``tests/models/``; the model tests come from the GitHub release archive of the installed version
  (``https://codeload.github.com/huggingface/transformers/tar.gz/refs/tags/v<installed>``), or from
  ``--transformers-source`` (a checkout or an unpacked archive, or a ``.tar.gz``) on a machine without
  GitHub. ``--common-from-sdist`` then puts the installed version's shared mixins over that source's.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pruneattn-conformance"
OUT = ROOT / "benchmarks" / "results" / "conformance"
ARCHIVE = "https://codeload.github.com/huggingface/transformers/tar.gz/refs/tags/v{version}"


@dataclass(frozen=True)
class Suite:
    """One test file of a project, optionally with only the node ids matching ``select`` (fnmatch), and
    with ``settings``: names of the plugin's adjustments to the models the tests build, made in both the
    unpatched and the patched run (see ``tools/conformance_plugin.py``)."""

    name: str
    project: str  # "transformers" or "timm"
    file: str  # relative to the project's source root
    select: tuple[str, ...] | None = None
    settings: tuple[str, ...] = ()


_HF = {  # suite name -> model test directory, for the families pruneattn patches
    "vit": "vit", "deit": "deit", "dinov2": "dinov2", "dinov2_with_registers": "dinov2_with_registers",
    "clip": "clip", "siglip": "siglip", "siglip2": "siglip2", "dinov3_vit": "dinov3_vit", "vit_msn": "vit_msn",
    "ijepa": "ijepa", "vit_mae": "vit_mae", "llava": "llava", "qwen2_5_vl": "qwen2_5_vl",
    "paligemma": "paligemma", "qwen2_vl": "qwen2_vl", "qwen3_vl": "qwen3_vl", "qwen3_vl_moe": "qwen3_vl_moe",
    "qwen3_5": "qwen3_5", "qwen3_5_moe": "qwen3_5_moe", "glm4v": "glm4v", "glm4v_moe": "glm4v_moe",
    "glm46v": "glm46v", "internvl": "internvl", "gemma3": "gemma3", "mistral3": "mistral3", "smolvlm": "smolvlm",
    "idefics3": "idefics3",
}
# timm's tests/test_models.py is parametrized over every model: these ones stand for the classes pruneattn
# patches (VisionTransformer: plain, registers / no class token, distilled, parallel blocks, hybrid stem;
# Eva: EVA02, rotary, mixed rotary, DINOv3; NaFlexVit), plus its tests of NaFlexViT, ViT and Eva features.
TIMM_MODELS = (
    "test_vit", "test_vit2", "test_vit3", "test_vit4", "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
    "vit_small_patch16_18x2_224", "vit_tiny_r_s16_p8_224", "eva02_tiny_patch14_224", "vit_small_patch16_rope_mixed_224",
    "vit_small_patch16_dinov3", "naflexvit_base_patch16_gap",
)


def model_patterns(models: tuple[str, ...]) -> tuple[str, ...]:
    """fnmatch patterns of the node ids whose parameters name one of ``models`` (with or without a
    pretrained tag), e.g. ``test_model_forward[1-vit_tiny_patch16_224]``."""
    out = []
    for m in models:
        for before in ("[[]", "-"):  # "[[]": a literal "[" in fnmatch
            out += [f"*{before}{m}]", f"*{before}{m}-*", f"*{before}{m}.*"]
    return tuple(out)


def suites(timm_models: tuple[str, ...] = TIMM_MODELS) -> list[Suite]:
    hf = [Suite(name, "transformers", f"tests/models/{d}/test_modeling_{d}.py") for name, d in _HF.items()]
    # transformers' Qwen2.5-VL test tower has no full-attention block (so nothing can be patched): run the
    # file again with its last block attending to the whole image, as in every released checkpoint.
    hf.append(Suite("qwen2_5_vl_full_attention", "transformers", "tests/models/qwen2_5_vl/test_modeling_qwen2_5_vl.py",
                    settings=("tower_full_attention",)))
    select = model_patterns(timm_models) + ("*::test_naflexvit_*", "*::test_vit_*", "*::test_hybrid_vit_*",
                                            "*::test_eva_*")
    return hf + [Suite("timm", "timm", "tests/test_models.py", select)]


# What each of the plugin's settings does, for the report.
SETTINGS = {"tower_full_attention": "the tower's last block attends to the whole image, in both runs"}


# ----------------------------------------------------------------------------- sources


def _unpack(archive: Path, into: Path) -> Path:
    """Unpack a .tar.gz into ``into`` (once); returns its single top-level directory."""
    if not into.is_dir():
        tmp = into.with_name(into.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        tmp.rename(into)
    (top,) = [p for p in into.iterdir() if p.is_dir()]
    return top


def sdist(project: str, version: str, cache: Path) -> Path:
    """The unpacked PyPI source distribution of ``project==version`` (downloaded once with pip)."""
    folder = cache / "sdist"
    folder.mkdir(parents=True, exist_ok=True)
    found = sorted(folder.glob(f"{project}-{version}.tar.gz"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q",
                        "-d", str(folder), f"{project}=={version}"], check=True)
        found = sorted(folder.glob(f"{project}-{version}.tar.gz"))
    return _unpack(found[0], cache / f"{project}-{version}-sdist")


# What transformers' tests import beyond its runtime dependencies (its "testing" extra, in part).
TEST_DEPENDENCIES = ("parameterized", "timeout-decorator", "httpx", "httpcore", "certifi", "requests", "urllib3",
                     "charset-normalizer", "accelerate", "psutil")
# Shared test modules that the installed release's mixins import; where a source from another release
# lacks one, it is replaced by a stand-in with the names they import (their tests are then not run).
_DISTRIBUTED = "".join(
    f"def {name}(*args, **kwargs):\n    raise unittest.SkipTest('distributed testing utilities: not in this test source')\n\n\n"
    for name in ("run_distributed", "_get_distributed_backend", "_get_distributed_device_type", "_get_rank_device",
                 "_set_rank_device", "_start_rank_processes"))
STAND_INS = {"tests/exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
             "tests/distributed_testing_utils.py": "import unittest\n\n\n" + _DISTRIBUTED}


def testing_packages(cache: Path) -> Path:
    """A folder with the test-only packages the interpreter lacks (``pip install --target``, no
    dependencies, so that nothing the interpreter has is shadowed)."""
    folder = cache / "testing-packages"
    missing = []
    for dist in TEST_DEPENDENCIES:
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            if not any(folder.glob(f"{dist.replace('-', '_')}-*.dist-info")):
                missing.append(dist)
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(folder), *missing],
                       check=True)
    return folder


def transformers_source(version: str, cache: Path, source: str | None, common_from_sdist: bool) -> Path:
    """A directory holding transformers' ``tests/`` for ``version`` (the release source's, or ``source``'s)."""
    if source is None:
        archive = cache / f"transformers-v{version}.tar.gz"
        if not archive.exists():
            with urllib.request.urlopen(ARCHIVE.format(version=version), timeout=120) as r, open(archive, "wb") as f:
                shutil.copyfileobj(r, f)
        root = _unpack(archive, cache / f"transformers-v{version}")
    elif Path(source).is_file():
        root = _unpack(Path(source), cache / f"transformers-{Path(source).name.removesuffix('.tar.gz')}")
    else:
        root = Path(source)
    if not common_from_sdist:
        return root
    # The installed release's shared mixins and its own src/ (which they read) over the other source; its
    # root conftest.py is left out (written for another release's torch settings).
    released = sdist("transformers", version, cache)
    merged = cache / f"transformers-{version}-merged"
    shutil.rmtree(merged, ignore_errors=True)
    shutil.copytree(root / "tests", merged / "tests", symlinks=True)
    for name in ("pyproject.toml", "setup.py"):
        if (root / name).exists():
            shutil.copy2(root / name, merged / name)
    if (root / "utils").is_dir():
        shutil.copytree(root / "utils", merged / "utils", symlinks=True)
    for common in (released / "tests").glob("*.py"):
        shutil.copy2(common, merged / "tests" / common.name)
    (merged / "src").symlink_to(released / "src", target_is_directory=True)
    for name, text in STAND_INS.items():
        path = merged / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / "__init__.py").touch()
            path.write_text(text, encoding="utf-8")
    return merged


# ----------------------------------------------------------------------------- running


@dataclass
class Run:
    """One run of one suite: each test's record (outcome, message, patched models) and the run's time."""

    outcomes: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    returncode: int = 0
    timed_out: bool = False
    stderr_tail: str = ""

    def counts(self) -> dict[str, int]:
        out = {k: 0 for k in ("passed", "failed", "error", "skipped")}
        for record in self.outcomes.values():
            out[record["outcome"]] = out.get(record["outcome"], 0) + 1
        return out


def run(suite: Suite, root: Path, mode: str, log: Path, *, workers: int = 1, timeout: float = 3600,
        paths: tuple[Path, ...] = (), extra: tuple[str, ...] = ()) -> Run:
    """Run ``suite``'s test file under ``root`` in a subprocess, ``mode`` "patched" or "unpatched";
    ``paths`` go on the subprocess's ``PYTHONPATH`` after this repository and ``root``."""
    log.unlink(missing_ok=True)
    python_path = [str(ROOT), str(root), *map(str, paths), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PRUNEATTN_CONFORMANCE": mode, "PRUNEATTN_CONFORMANCE_LOG": str(log),
           "PYTHONPATH": os.pathsep.join(p for p in python_path if p),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    env.pop("TRITON_INTERPRET", None)  # pruneattn's CPU path, as a user's CPU run takes it
    if suite.select is not None:
        env["PRUNEATTN_CONFORMANCE_SELECT"] = json.dumps(list(suite.select))
    env["PRUNEATTN_CONFORMANCE_SETTINGS"] = ",".join(suite.settings)
    cmd = [sys.executable, "-m", "pytest", suite.file, "-p", "tools.conformance_plugin", "-q", "-rN",
           "-p", "no:cacheprovider", "--rootdir", str(root), *(["-n", str(workers)] if workers > 1 else []), *extra]
    start = time.perf_counter()
    result = Run()
    try:
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        result.returncode, tail = done.returncode, (done.stdout + done.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        result.timed_out, result.returncode = True, -1
        tail = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""))[-3000:]
    result.seconds = time.perf_counter() - start
    result.stderr_tail = tail
    if log.exists():
        for line in log.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            result.outcomes[record["nodeid"]] = record
    return result


def patched_only(unpatched: Run, patched: Run) -> list[dict]:
    """The tests that pass unpatched but fail or error patched (a test missing from the patched run, e.g.
    after a crash, counts as failed)."""
    out = []
    for nodeid, base in sorted(unpatched.outcomes.items()):
        if base["outcome"] != "passed":
            continue
        got = patched.outcomes.get(nodeid, {"outcome": "missing", "message": "not run (the patched run stopped)"})
        if got["outcome"] not in ("passed", "skipped"):
            out.append({"test": nodeid, "outcome": got["outcome"], "message": got.get("message", "")})
    return out


# ----------------------------------------------------------------------------- results


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "triton", "transformers", "timm", "open_clip_torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        out["pruneattn"] = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                                          capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["pruneattn"] = "unknown"
    return out


def machine() -> dict[str, object]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count()}


def _settings(suite: dict) -> str:
    return "".join(f" ({SETTINGS[name]})" for name in suite.get("settings", ()))


def markdown(results: dict) -> str:
    """The report: versions, sources, per-file counts, then every patched-only failure."""
    lines = ["# Conformance: other projects' tests on patched models (keep rate 1.0)", "",
             f"Last run {results['date']} on {results['machine']['platform']} ({results['machine']['cpus']} CPUs), "
             f"{results['minutes']:.0f} minutes. Generated by `tools/conformance.py`; the reasons of the "
             "failures are in `docs/conformance.md`.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".", ""]
    lines += [f"- {project} tests: {where}" for project, where in results["sources"].items()]
    lines += ["", "| suite | test file | tests | passed unpatched | passed patched | failed patched only | "
              "tests that patched a model | minutes | pruneattn, date |", "|---|---|---|---|---|---|---|---|---|"]
    for s in results["suites"]:
        u, p = s["unpatched"], s["patched"]
        note = " (timed out)" if s.get("timed_out") else ""
        ran = f"{s.get('pruneattn', results['versions'].get('pruneattn', '?'))}, {s.get('date', results['date'])}"
        lines.append(f"| {s['name']} | `{s['file']}`{_settings(s)} | {s['tests']} | {u['passed']} | {p['passed']} | "
                     f"{len(s['patched_only'])}{note} | {s['tests_with_patched_model']} | {s['minutes']:.1f} | {ran} |")
    lines += ["", "## Patched-only failures", ""]
    failures = [(s["name"], f) for s in results["suites"] for f in s["patched_only"]]
    if not failures:
        lines.append("None.")
    for name, f in failures:
        lines.append(f"- `{f['test']}` ({f['outcome']}): {f['message']}")
    return "\n".join(lines) + "\n"


def updated(report: dict, new: dict) -> dict:
    """``report`` with the suites of ``new`` in place of its own of the same names (new ones appended);
    refused where the two ran on other versions of anything but pruneattn (each suite records its own)."""
    differ = {k for k in {*report["versions"], *new["versions"]} - {"pruneattn"}
              if report["versions"].get(k) != new["versions"].get(k)}
    if differ:
        raise SystemExit(f"conformance.py --update: the report ran on other versions of {', '.join(sorted(differ))}; "
                         "run every suite instead")
    old = report["versions"].get("pruneattn")
    suites = {s["name"]: {"pruneattn": old, "date": report["date"], **s} for s in report["suites"]}
    suites.update({s["name"]: s for s in new["suites"]})
    return {**report, "date": new["date"], "machine": new["machine"],
            "versions": {**new["versions"], "pruneattn": "per suite, below"},
            "sources": {**report["sources"], **new["sources"]},
            "minutes": sum(s["minutes"] for s in suites.values()), "suites": list(suites.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=("transformers", "timm"), help="these projects only")
    parser.add_argument("--suite", action="append", help="these suites only (names: " +
                        ", ".join(s.name for s in suites()) + ")")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where sources are downloaded and unpacked")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--transformers-source", help="a transformers checkout, unpacked archive or .tar.gz")
    parser.add_argument("--common-from-sdist", action="store_true",
                        help="put the installed transformers' shared test mixins (from its sdist) over the source's")
    parser.add_argument("--timm-models", nargs="+", default=list(TIMM_MODELS))
    parser.add_argument("--workers", type=int, default=1, help="pytest-xdist workers per run")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run of one file")
    parser.add_argument("--update", action="store_true",
                        help="keep the other suites of the report in --out (same versions of everything but pruneattn) "
                             "and replace those run now, e.g. after a fix")
    args = parser.parse_args(argv)
    if args.update and not (args.out / "conformance.json").is_file():
        parser.error(f"--update: no report to update in {args.out}")

    chosen = [s for s in suites(tuple(args.timm_models))
              if (not args.only or s.project in args.only) and (not args.suite or s.name in args.suite)]
    info = versions()
    args.cache.mkdir(parents=True, exist_ok=True)
    roots, sources, paths = {}, {}, {"timm": (), "transformers": ()}
    if any(s.project == "timm" for s in chosen):
        roots["timm"] = sdist("timm", info["timm"], args.cache)
        sources["timm"] = f"PyPI source distribution timm=={info['timm']} (`tests/test_models.py`)"
    if any(s.project == "transformers" for s in chosen):
        roots["transformers"] = transformers_source(info["transformers"], args.cache, args.transformers_source,
                                                    args.common_from_sdist)
        paths["transformers"] = (roots["transformers"] / "utils", testing_packages(args.cache))
        where = args.transformers_source or ARCHIVE.format(version=info["transformers"])
        sources["transformers"] = f"{where}" + (
            f", with the shared mixins `tests/*.py` and `src/` of the PyPI source distribution "
            f"transformers=={info['transformers']} over it" if args.common_from_sdist else "")
        stood_in = [n for n, text in STAND_INS.items()
                    if (roots["transformers"] / n).is_file() and (roots["transformers"] / n).read_text() == text]
        if stood_in:
            sources["transformers"] += f"; stand-ins (no tests) for {', '.join(stood_in)}, which that source lacks"
    start = time.perf_counter()
    results = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine(), "versions": info,
               "sources": sources, "timm_models": args.timm_models, "suites": []}
    logs = args.cache / "logs"
    logs.mkdir(exist_ok=True)
    for suite in chosen:
        runs = {mode: run(suite, roots[suite.project], mode, logs / f"{suite.name}-{mode}.jsonl", workers=args.workers,
                          timeout=args.timeout, paths=paths[suite.project]) for mode in ("unpatched", "patched")}
        failures = patched_only(runs["unpatched"], runs["patched"])
        entry = {"name": suite.name, "file": suite.file, "settings": list(suite.settings),
                 "pruneattn": info.get("pruneattn"), "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                 "tests": len(runs["unpatched"].outcomes),
                 "unpatched": runs["unpatched"].counts(), "patched": runs["patched"].counts(),
                 "tests_with_patched_model": sum(1 for r in runs["patched"].outcomes.values() if r.get("patched_models")),
                 "timed_out": any(r.timed_out for r in runs.values()),
                 "minutes": sum(r.seconds for r in runs.values()) / 60, "patched_only": failures}
        if not runs["unpatched"].outcomes:
            entry["note"] = runs["unpatched"].stderr_tail[-1500:]
        results["suites"].append(entry)
        print(f"{suite.name}: {entry['tests']} tests, {len(failures)} patched-only failures, "
              f"{entry['minutes']:.1f} min", flush=True)
    results["minutes"] = (time.perf_counter() - start) / 60
    if args.update:
        results = updated(json.loads((args.out / "conformance.json").read_text(encoding="utf-8")), results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "conformance.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (args.out / "conformance.md").write_text(markdown(results), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
