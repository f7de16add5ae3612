"""The Python examples of the README and of docs/*.md run as printed, on the CPU, in a fresh interpreter,
and print what the page shows.

``<!-- runnable -->`` marks an example that runs as printed, offline; ``<!-- runnable: continues -->``
one that runs after the example before it (on the same page). ``<!-- needs the Hugging Face Hub -->``
marks one that downloads weights: it runs as printed too, from the local Hugging Face cache, and is
skipped (saying so) where the weights are not there. Nothing in an example is changed before it runs.
Where a page shows what an example prints (``# ...`` lines right under a ``print(...)``), the example
must print exactly that, and nothing on stderr (no warnings the page does not show).
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"<!-- (runnable(?:: continues)?|needs the Hugging Face Hub) -->\n```python\n(.*?)```", re.S)
_PYTHON = re.compile(r"```python\n(.*?)```", re.S)
# What a download from the Hub looks like in an example (a runnable one must not have it).
_HUB_CALLS = ("pretrained=True", "from_pretrained(")
# How huggingface_hub says that it could not fetch a file offline.
_OFFLINE_ERRORS = ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "outgoing traffic has been disabled")


def marked_snippets(text: str) -> tuple[list[str], list[str]]:
    """(runnable examples, examples that need the Hub) of ``text``; continuation blocks are joined to
    the runnable example before them."""
    runnable: list[str] = []
    hub: list[str] = []
    for mark, code in _BLOCK.findall(text):
        if mark == "runnable: continues":
            if not runnable:
                raise ValueError("a continuation block needs a runnable block before it")
            runnable[-1] += "\n" + code
        elif mark == "runnable":
            runnable.append(code)
        else:
            hub.append(code)
    return runnable, hub


def shown_output(code: str) -> list[str]:
    """The lines the example says it prints: the ``# `` comment lines right under each top-level ``print``."""
    lines = code.splitlines()
    out: list[str] = []
    for node in ast.parse(code).body:
        call = getattr(node, "value", None)
        if isinstance(node, ast.Expr) and isinstance(call, ast.Call) and getattr(call.func, "id", "") == "print":
            for line in lines[node.end_lineno:]:
                if not line.startswith("# "):
                    break
                out.append(line[2:])
    return out


def _collect() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    runnable, hub = [], []
    for page in PAGES:
        r, h = marked_snippets(page.read_text(encoding="utf-8"))
        runnable += [(f"{page.name}:{i}", code) for i, code in enumerate(r)]
        hub += [(f"{page.name}:{i}", code) for i, code in enumerate(h)]
    return runnable, hub


RUNNABLE, HUB = _collect()


def run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter on the CPU (one thread, no Triton interpreter, the Hub offline),
    importing this checkout's pruneattn."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_marker_parser():
    text = ("<!-- runnable -->\n```python\na = 1\n```\n<!-- runnable: continues -->\n```python\nb = a\n```\n"
            "<!-- needs the Hugging Face Hub -->\n```python\nc = 2\n```\n```python\nnot marked\n```\n")
    assert marked_snippets(text) == (["a = 1\n\nb = a\n"], ["c = 2\n"])
    with pytest.raises(ValueError, match="continuation"):
        marked_snippets("<!-- runnable: continues -->\n```python\nx\n```\n")


def test_shown_output_parser():
    code = "x = 1\n# not output\nprint(x)\n# 1\n# 2\ny = 2\n# not output\nprint(\n    y)\n# 3\n"
    assert shown_output(code) == ["1", "2", "3"]
    assert shown_output("print(1)\n") == []


def test_pages_have_the_marked_examples():
    readme = [c for name, c in RUNNABLE if name.startswith("README.md:")]
    assert len(readme) >= 3 and "pretrained=False" in readme[0] and shown_output(readme[0])
    assert any(name.startswith("README.md:") for name, _ in HUB)
    api = [c for name, c in RUNNABLE if name.startswith("api.md:")]
    assert api and "attention_scores" in api[0] and "attention_stats" in api[0]
    assert any("score_hook" in c and shown_output(c) for c in api)
    assert any("for images, labels in loader" in c for _, c in HUB)
    assert any(name.startswith("vlm.md:") for name, _ in RUNNABLE)


def test_quick_start_runs_offline_with_the_pretrained_form_beside_it():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    runnable, hub = marked_snippets(quick)
    assert len(runnable) == 1 and len(hub) == 1
    assert "pretrained=False" in runnable[0] and re.search(r"^images = ", runnable[0], re.M)  # defined, not assumed
    assert "pretrained=True" in hub[0]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_python_example_parses(page):
    """Examples that cannot run here (a GPU, the Hub) still parse."""
    for code in _PYTHON.findall(page.read_text(encoding="utf-8")):
        compile(code, page.name, "exec")


def hub_calls(code: str) -> list[str]:
    """The Hub downloads that ``code`` makes (comments do not count)."""
    lines = "\n".join(line.split("#", 1)[0] for line in code.splitlines())
    return [c for c in _HUB_CALLS if c in lines]


@pytest.mark.parametrize("name, code", RUNNABLE, ids=[n for n, _ in RUNNABLE])
def test_runnable_example_downloads_nothing(name, code):
    assert not hub_calls(code), "mark it <!-- needs the Hugging Face Hub -->"


@pytest.mark.parametrize("name, code", HUB, ids=[n for n, _ in HUB])
def test_hub_example_says_it_needs_the_hub(name, code):
    assert hub_calls(code), "nothing is downloaded here: mark it <!-- runnable -->"


@pytest.mark.parametrize("name, code", RUNNABLE, ids=[n for n, _ in RUNNABLE])
def test_runnable_example_runs_as_printed(name, code, tmp_path):
    res = run(code, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    shown = shown_output(code)
    if shown:
        assert res.stdout.splitlines() == shown, res.stdout
        assert res.stderr == "", f"the page does not show what this writes to stderr:\n{res.stderr[-3000:]}"


@pytest.mark.parametrize("name, code", HUB, ids=[n for n, _ in HUB])
def test_hub_example_runs_as_printed_from_the_cache(name, code, tmp_path):
    res = run(code, tmp_path)
    if res.returncode != 0 and any(e in res.stderr for e in _OFFLINE_ERRORS):
        pytest.skip("the example's weights are not in the local Hugging Face cache (it needs the Hub once)")
    assert res.returncode == 0, res.stderr[-3000:]
