"""The README's Python examples marked ``<!-- runnable -->`` run as pasted, on the CPU, in a fresh interpreter.

A block marked ``<!-- runnable: continues -->`` runs after the block before it. Only the sizes of the
fine-tuning example are made small (and its weights random: no network here); nothing else is changed.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"<!-- runnable(: continues)? -->\n```python\n(.*?)```", re.S)
# Exact substitutions, each of which must occur in the snippet: small sizes, no download.
SMALLER = {
    "pretrained=True": "pretrained=False",
    "torch.randn(64, 3, 224, 224), torch.randint(0, 1000, (64,))": "torch.randn(4, 3, 224, 224), torch.randint(0, 1000, (4,))",
    "batch_size=16": "batch_size=2",
}


def runnable_snippets(text: str) -> list[str]:
    """The marked Python blocks of ``text``, continuation blocks joined to the block before them."""
    out: list[str] = []
    for continues, code in _BLOCK.findall(text):
        if continues:
            if not out:
                raise ValueError("a continuation block needs a runnable block before it")
            out[-1] += "\n" + code
        else:
            out.append(code)
    return out


def shrink(code: str) -> str:
    for old, new in SMALLER.items():
        if "loader" in code and "for images" in code:
            assert old in code, f"the fine-tuning example no longer contains {old!r}"
        code = code.replace(old, new)
    return code


SNIPPETS = runnable_snippets((ROOT / "README.md").read_text(encoding="utf-8"))


def test_readme_has_the_runnable_examples():
    assert len(SNIPPETS) >= 2
    assert "attention_scores" in SNIPPETS[0] and "attention_stats" in SNIPPETS[0]
    assert any("for images, labels in loader" in s for s in SNIPPETS)


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs_on_cpu(index, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    code = "import torch\ntorch.set_num_threads(1)\n" + shrink(SNIPPETS[index])
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
