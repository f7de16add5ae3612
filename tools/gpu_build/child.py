"""The environment of the processes the suites start: this repository importable, the interpreter on or off.

The account and the launch recording need Triton's interpreter on before the kernels are defined; the
compilation needs it off. Each runs in a fresh process with ``TRITON_INTERPRET`` set accordingly and
the repository root first on ``PYTHONPATH``, so that the child imports the same ``tools`` and
``pruneattn`` as its parent.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ROOT", "child_env"]

ROOT = Path(__file__).resolve().parents[2]


def child_env(interpret: bool) -> dict[str, str]:
    """``os.environ`` with ``TRITON_INTERPRET=1`` (``interpret``) or without it, and the repository root on the path."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env
