"""The README's Python examples run as printed, on the CPU, in a fresh interpreter.

``<!-- runnable -->`` marks an example that runs as printed, offline; ``<!-- runnable: continues -->``
one that runs after the example before it. ``<!-- needs the Hugging Face Hub -->`` marks one that
downloads weights: it runs as printed too, from the local Hugging Face cache, and is skipped (saying
so) where the weights are not there. Nothing in an example is changed before it runs.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"<!-- (runnable(?:: continues)?|needs the Hugging Face Hub) -->\n```python\n(.*?)```", re.S)
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


RUNNABLE, HUB = marked_snippets((ROOT / "README.md").read_text(encoding="utf-8"))


def run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter on the CPU (one thread, no Triton interpreter, the Hub offline)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_marker_parser():
    text = ("<!-- runnable -->\n```python\na = 1\n```\n<!-- runnable: continues -->\n```python\nb = a\n```\n"
            "<!-- needs the Hugging Face Hub -->\n```python\nc = 2\n```\n```python\nnot marked\n```\n")
    assert marked_snippets(text) == (["a = 1\n\nb = a\n"], ["c = 2\n"])
    with pytest.raises(ValueError, match="continuation"):
        marked_snippets("<!-- runnable: continues -->\n```python\nx\n```\n")


def test_readme_has_the_marked_examples():
    assert len(RUNNABLE) >= 1 and len(HUB) >= 1
    assert "attention_scores" in RUNNABLE[0] and "attention_stats" in RUNNABLE[0]
    assert any("for images, labels in loader" in s for s in HUB)


def hub_calls(code: str) -> list[str]:
    """The Hub downloads that ``code`` makes (comments do not count)."""
    lines = "\n".join(line.split("#", 1)[0] for line in code.splitlines())
    return [c for c in _HUB_CALLS if c in lines]


@pytest.mark.parametrize("index", range(len(RUNNABLE)))
def test_runnable_example_downloads_nothing(index):
    assert not hub_calls(RUNNABLE[index]), "mark it <!-- needs the Hugging Face Hub -->"


@pytest.mark.parametrize("index", range(len(HUB)))
def test_hub_example_says_it_needs_the_hub(index):
    assert hub_calls(HUB[index]), "nothing is downloaded here: mark it <!-- runnable -->"


@pytest.mark.parametrize("index", range(len(RUNNABLE)))
def test_runnable_example_runs_as_printed(index, tmp_path):
    res = run(RUNNABLE[index], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize("index", range(len(HUB)))
def test_hub_example_runs_as_printed_from_the_cache(index, tmp_path):
    res = run(HUB[index], tmp_path)
    if res.returncode != 0 and any(e in res.stderr for e in _OFFLINE_ERRORS):
        pytest.skip("the example's weights are not in the local Hugging Face cache (it needs the Hub once)")
    assert res.returncode == 0, res.stderr[-3000:]
