"""Supported versions of the dependencies, and the combinations known to be broken.

:data:`SUPPORTED` is the supported-versions table of docs/versions.md: the floors that ``setup.py`` declares
and the version matrix (``tools/matrix.sh``) tests, and the newest versions it tested.
:func:`check_interpreter` refuses a combination that is known to break Triton's CPU interpreter, naming
the fix; ``pruneattn.kernels`` calls it on import when ``TRITON_INTERPRET=1`` is set.

Standard library only: imported before torch, and by ``pruneattn --version``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata

__all__ = ["SUPPORTED", "BrokenCombination", "Supported", "check_interpreter", "installed", "interpreter_problems",
           "release", "versions_table"]


@dataclass(frozen=True)
class Supported:
    """One row of the supported-versions table."""

    name: str
    floor: str  # the lowest version tested; setup.py declares it (Python: python_requires)
    newest: str  # the newest version tested
    note: str = ""


SUPPORTED: tuple[Supported, ...] = (
    Supported("Python", "3.11", "3.13", "transformers 5.21 and later need 3.11"),
    Supported("torch", "2.11", "2.15.0"),
    Supported("triton", "3.6", "3.9.0", "Linux only; installed with torch, which pins it "
                                       "(torch 2.11: 3.6.0, 2.12.1: 3.7.1, 2.14.1: 3.8.0, 2.15: 3.9.0)"),
    Supported("numpy", "1.26", "2.5.5", "Triton's CPU interpreter needs numpy < 2.4 with triton older than "
                                        "3.7.1 (refused at its first use, with the fix); GPU runs take any"),
    Supported("transformers", "5.24", "5.25.0", "Hugging Face models (the `models` and `test` extras); 5.25 installs the `kernels` package 0.19 with it"),
    Supported("timm", "1.0.31", "1.0.31", "timm models (the `models` and `test` extras); 1.0.30 and older fail the RoPE ViT and EVA tests"),
)


def release(version: str) -> tuple[int, ...]:
    """The release numbers of a version string: ``"2.14.1+cu130"`` -> (2, 14, 1), ``"3.7.0rc1"`` -> (3, 7, 0)."""
    out = []
    for part in version.split("+", 1)[0].split("."):
        m = re.match(r"\d+", part)
        if m is None:
            break
        out.append(int(m.group()))
        if m.end() < len(part):  # a pre-release suffix ends the release numbers
            break
    return tuple(out)


def installed(name: str) -> str | None:
    """The installed version of distribution ``name``, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class BrokenCombination:
    """Versions that fail together in Triton's CPU interpreter: what happens and the fix."""

    package: str
    below: str  # broken while ``package`` is older than this...
    other: str
    at_least: str  # ...and ``other`` is at least this
    symptom: str
    fix: str

    def applies(self, versions: dict[str, str | None]) -> bool:
        mine, theirs = versions.get(self.package), versions.get(self.other)
        if mine is None or theirs is None:
            return False
        return release(mine) < release(self.below) and release(theirs) >= release(self.at_least)

    def message(self, versions: dict[str, str | None]) -> str:
        return (f"pruneattn: {self.package} {versions[self.package]} with {self.other} {versions[self.other]} "
                f"cannot run Triton's CPU interpreter (TRITON_INTERPRET=1): {self.symptom}. Fix: {self.fix}. "
                "Runs on a GPU (no interpreter) and pruneattn's CPU path (TRITON_INTERPRET unset) are not affected.")


BROKEN_UNDER_INTERPRETER: tuple[BrokenCombination, ...] = (
    BrokenCombination(
        "triton", "3.7.1", "numpy", "2.4",
        symptom="its kernels fail with 'only 0-dimensional arrays can be converted to Python scalars' "
                "(fixed in triton 3.7.1)",
        fix='pip install "numpy<2.4" (or a torch whose triton is 3.7.1 or newer: torch 2.12.1 and later)',
    ),
)


def interpreter_problems(versions: dict[str, str | None] | None = None) -> list[str]:
    """Messages for the known-broken combinations among ``versions`` (default: the installed ones)."""
    if versions is None:
        names = {c.package for c in BROKEN_UNDER_INTERPRETER} | {c.other for c in BROKEN_UNDER_INTERPRETER}
        versions = {n: installed(n) for n in names}
    return [c.message(versions) for c in BROKEN_UNDER_INTERPRETER if c.applies(versions)]


def check_interpreter(versions: dict[str, str | None] | None = None) -> None:
    """Raise ``RuntimeError`` naming the fix if the versions cannot run Triton's CPU interpreter."""
    problems = interpreter_problems(versions)
    if problems:
        raise RuntimeError("\n".join(problems))


def versions_table() -> str:
    """The supported-versions table of docs/versions.md (Markdown; tests/test_versions.py checks the page)."""
    rows = ["| | lowest tested (declared in `setup.py`) | newest tested | notes |", "|---|---|---|---|"]
    rows += [f"| {s.name} | {s.floor} | {s.newest} | {s.note} |" for s in SUPPORTED]
    return "\n".join(rows)
