"""The one place that decides which implementation runs: Triton kernels, fast PyTorch, or reference.

- CUDA tensors: the Triton kernels.
- CPU tensors: the fast PyTorch path (:mod:`pruneattn.cpu`), or the Triton kernels in Triton's CPU
  interpreter when ``TRITON_INTERPRET=1`` was set before ``pruneattn`` was imported.
- ``with pruneattn.use_backend("reference" | "cpu" | "triton"):`` forces one (tests, benchmarks).
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from pruneattn._env import interpreting

BACKENDS = ("triton", "cpu", "reference")
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("pruneattn_backend", default=None)


def backend_for(device: torch.device) -> str:
    """Name of the backend that runs on ``device``."""
    forced = _forced.get()
    if forced is not None:
        return forced
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu" and interpreting():
        return "triton"
    return "cpu"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside the ``with`` block (``"triton"``, ``"cpu"`` or ``"reference"``)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)
