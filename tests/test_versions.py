"""Supported versions: the table of docs/versions.md, setup.py's floors and the committed version matrix agree,
and Triton's CPU interpreter refuses the combinations known to break it, naming the fix."""
from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from pruneattn import _versions
from pruneattn._versions import SUPPORTED, check_interpreter, interpreter_problems, release, versions_table

ROOT = Path(__file__).resolve().parents[1]
MATRIX = ROOT / "benchmarks" / "results" / "matrix"
TABLE = {s.name: s for s in SUPPORTED}


def test_release_numbers():
    assert release("2.14.1+cu130") == (2, 14, 1)
    assert release("3.7.0rc1") == (3, 7, 0)
    assert release("2.4") == (2, 4)
    assert release("1.0.23.dev0") == (1, 0, 23)


@pytest.mark.parametrize("triton, numpy, broken", [
    ("3.6.0", "2.4.0", True), ("3.7.0", "2.4.6", True), ("3.7.1", "2.4.6", False), ("3.9.0", "2.5.0", False),
    ("3.6.0", "2.3.5", False), ("3.6.0", "1.26.4", False), (None, "2.4.6", False), ("3.6.0", None, False),
])
def test_known_broken_interpreter_combination(triton, numpy, broken):
    versions = {"triton": triton, "numpy": numpy}
    problems = interpreter_problems(versions)
    assert bool(problems) is broken
    if broken:
        assert f"triton {triton} with numpy {numpy}" in problems[0]
        assert 'pip install "numpy<2.4"' in problems[0] and "TRITON_INTERPRET=1" in problems[0]
        with pytest.raises(RuntimeError, match=re.escape('Fix: pip install "numpy<2.4"')):
            check_interpreter(versions)
    else:
        check_interpreter(versions)


def test_the_installed_versions_are_not_refused_here():
    """This environment runs the suite, so it must not be a known-broken one."""
    assert interpreter_problems() == []


def test_the_kernels_refuse_a_broken_combination_on_import():
    """With TRITON_INTERPRET=1, importing the kernels (the interpreter's first use) raises the message."""
    code = (
        "import importlib.metadata as m\n"
        "real = m.version\n"
        "m.version = lambda n: {'triton': '3.6.0', 'numpy': '2.4.6'}.get(n) or real(n)\n"
        "import pruneattn.kernels\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode != 0
    assert "RuntimeError: pruneattn: triton 3.6.0 with numpy 2.4.6" in res.stderr, res.stderr[-2000:]
    assert 'pip install "numpy<2.4"' in res.stderr


def test_versions_page_table_is_the_supported_versions():
    text = (ROOT / "docs" / "versions.md").read_text(encoding="utf-8")
    table = text.split("<!-- supported versions:", 1)[1].split("-->", 1)[1]
    assert table.split("<!-- end of supported versions -->", 1)[0].strip() == versions_table()


def test_readme_links_the_versions_page():
    assert "(docs/versions.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


def _setup_kwargs() -> dict:
    """The keyword arguments setup.py hands to setuptools.setup."""
    import setuptools

    seen: dict = {}
    real = setuptools.setup
    setuptools.setup = lambda **kw: seen.update(kw)
    try:
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    finally:
        setuptools.setup = real
    return seen


def _floor(requirements: list[str], name: str) -> str:
    found = [r for r in requirements if re.match(rf"{re.escape(name)}\s*>=", r)]
    assert len(found) == 1, f"{name}: expected one '>=' requirement in {requirements}"
    return re.match(rf"{re.escape(name)}\s*>=\s*([\w.]+)", found[0]).group(1)


def test_setup_declares_the_tested_floors():
    kw = _setup_kwargs()
    assert kw["python_requires"] == f">={TABLE['Python'].floor}"
    for name in ("torch", "triton", "numpy"):
        assert _floor(kw["install_requires"], name) == TABLE[name].floor, name
    for extra in ("models", "test"):
        for name in ("transformers", "timm"):
            assert _floor(kw["extras_require"][extra], name) == TABLE[name].floor, (extra, name)


def _matrix_rows() -> dict[str, dict]:
    if os.environ.get("PRUNEATTN_MATRIX_RUN"):
        pytest.skip("tools/matrix.sh is writing the version-matrix results in this run; checked once committed")
    rows = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in MATRIX.glob("*.json")}
    if not rows:
        pytest.skip("no version-matrix results are committed in benchmarks/results/matrix (tools/matrix.sh writes them)")
    return rows


def test_matrix_tested_the_floors_and_the_newest_versions():
    rows = _matrix_rows()
    assert set(rows) >= {"oldest", "readme", "newest"}, sorted(rows)
    names = {"Python": "python", "torch": "torch", "triton": "triton", "numpy": "numpy",
             "transformers": "transformers", "timm": "timm"}
    for label, key in names.items():
        floor, newest = release(TABLE[label].floor), release(TABLE[label].newest)
        assert release(rows["oldest"]["versions"][key])[: len(floor)] == floor, (label, rows["oldest"]["versions"])
        assert release(rows["newest"]["versions"][key])[: len(newest)] == newest, (label, rows["newest"]["versions"])
    assert rows["readme"]["versions"]["torch"].startswith("2.14.1")  # the README's pin


def test_matrix_results_are_green_and_the_broken_combination_was_refused():
    rows = _matrix_rows()
    for name, row in rows.items():
        assert row["failed"] == row["errors"] == 0 and row["passed"] > 0, (name, row["failures"])
    refusal = rows["oldest"]["refusal"]
    assert refusal["refused_with_the_fix"], refusal
    assert release(refusal["versions"]["triton"]) < (3, 7, 1) and release(refusal["versions"]["numpy"]) >= (2, 4)
    assert (MATRIX / "matrix.md").is_file()


def test_ci_runs_the_readmes_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert ci in readme and "python -m pytest -q -n 2" in ci
    assert "matrix" not in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_versions_module_imports_nothing_heavy():
    code = "import sys; import pruneattn._versions; print(sorted(m for m in ('torch', 'triton', 'numpy') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr
    assert _versions.__all__
