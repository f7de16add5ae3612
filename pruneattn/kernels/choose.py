"""Per-shape choice between the two CUDA backends of attention + scores.

- ``"fused"``: the one-pass Triton kernel (:mod:`pruneattn.kernels.attention`) writing the output, each
  row's log2-sum-exp and the class row's logits; ``query="mean"`` adds the column pass.
- ``"sdpa"``: PyTorch's SDPA for the output plus the class-row kernel
  (:mod:`pruneattn.kernels.prefix_rows`); ``query="cls"`` only (SDPA exposes no per-row statistics
  through a stable API that the column pass could use).

Until a GPU has measured both, the fused kernel is chosen everywhere. ``pruneattn bench --gpu``
times both per (device, dtype, H, d, N) and writes ``choices.json`` beside its results; point
``PRUNEATTN_CHOICES`` at that file (or call :func:`load_table`) to use the measured choice, and
``PRUNEATTN_ATTENTION=fused|sdpa`` or :func:`force` to pin one (benchmarks and tests do).
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections.abc import Iterator

import torch

BACKENDS = ("fused", "sdpa")
DEFAULT = "fused"

# (device name, dtype, H, d, N) -> backend; filled from measurements (load_table), never guessed.
_TABLE: dict[tuple[str, str, int, int, int], str] = {}
_loaded_from: set[str] = set()
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("pruneattn_attention", default=None)


def table_key(device_name: str, dtype: torch.dtype | str, H: int, d: int, N: int) -> tuple[str, str, int, int, int]:
    return (str(device_name), str(dtype).replace("torch.", ""), int(H), int(d), int(N))


def load_table(path: str | os.PathLike) -> int:
    """Merge a ``choices.json`` written by ``pruneattn bench --gpu``; returns the number of entries."""
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)["choices"]
    for e in entries:
        if e["backend"] not in BACKENDS:
            raise ValueError(f"{path}: backend must be one of {BACKENDS}, got {e['backend']!r}")
        _TABLE[table_key(e["device"], e["dtype"], e["H"], e["d"], e["N"])] = e["backend"]
    _loaded_from.add(str(path))
    return len(entries)


@contextlib.contextmanager
def force(backend: str | None) -> Iterator[None]:
    """Pin the attention backend inside the ``with`` block (``None``: back to the per-shape choice)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    token = _forced.set(backend)
    try:
        yield
    finally:
        _forced.reset(token)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def attention_backend(q: torch.Tensor, query: str) -> str:
    """``"fused"`` or ``"sdpa"`` for attention + scores on ``q`` (B, H, N, d)."""
    if query != "cls":
        return "fused"
    forced = _forced.get() or os.environ.get("PRUNEATTN_ATTENTION") or None
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"PRUNEATTN_ATTENTION must be one of {BACKENDS}, got {forced!r}")
        return forced
    path = os.environ.get("PRUNEATTN_CHOICES")
    if path and path not in _loaded_from:
        load_table(path)
    if not _TABLE:
        return DEFAULT
    B, H, N, d = q.shape
    return _TABLE.get(table_key(_device_name(q.device), q.dtype, H, d, N), DEFAULT)
