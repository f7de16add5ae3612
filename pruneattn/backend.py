"""The one place that decides what runs: which backend, which attention kernel, which implementation.

Backend, by the tensors' device:

- CUDA tensors: the Triton kernels (:mod:`pruneattn.kernels.pipeline`).
- CPU tensors: the fast PyTorch path (:mod:`pruneattn.cpu`), or the Triton kernels in Triton's CPU
  interpreter when ``TRITON_INTERPRET=1`` was set before ``pruneattn`` was imported.
- ``with pruneattn.use_backend("reference" | "cpu" | "triton"):`` forces one (tests, benchmarks).

Attention kernel of the Triton backend for ``query="cls"``, per shape:

- ``"fused"``: the one-pass Triton kernel (:mod:`pruneattn.kernels.attention`) writing the output,
  each row's log2-sum-exp and the class row's logits; ``query="mean"`` adds the column pass.
- ``"sdpa"``: PyTorch's SDPA for the output plus the class-row kernel (:mod:`pruneattn.kernels.class_row`);
  ``query="cls"`` only (SDPA exposes no per-row statistics through a stable API that the column
  pass could use).

Until a GPU has measured both, the fused kernel is chosen everywhere. ``pruneattn bench --ops`` on a GPU times
both per (device, dtype, H, d, N) and writes ``choices.json`` beside its results; point
``PRUNEATTN_CHOICES`` at that file (or call :func:`load_choices`) to use the measured choice, and
``PRUNEATTN_ATTENTION=fused|sdpa`` or :func:`use_attention_kernel` to pin one.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pruneattn import cpu, reference
from pruneattn.validate import check_choice

BACKENDS = ("triton", "cpu", "reference")
ATTENTION_KERNELS = ("fused", "sdpa")
DEFAULT_ATTENTION_KERNEL = "fused"

_forced_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("pruneattn_backend", default=None)
_forced_kernel: contextvars.ContextVar[str | None] = contextvars.ContextVar("pruneattn_attention", default=None)
# (device name, dtype, H, d, N) -> attention kernel; filled from measurements (load_choices), never guessed.
_CHOICES: dict[tuple[str, str, int, int, int], str] = {}
_choices_loaded_from: set[str] = set()


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``).

    Triton reads the variable when a kernel is defined, so set it before importing ``pruneattn``.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def _pinned(var: contextvars.ContextVar[str | None], value: str | None) -> Iterator[None]:
    """``var`` set to ``value`` inside the ``with`` block, restored after it."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


# ----------------------------------------------------------------------------- backend


def backend_for(device: torch.device) -> str:
    """Name of the backend that runs on ``device``."""
    forced = _forced_backend.get()
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
    check_choice("backend", name, BACKENDS)
    with _pinned(_forced_backend, name):
        yield


# ----------------------------------------------------------------------------- attention kernel


def choice_key(device_name: str, dtype: torch.dtype | str, H: int, d: int, N: int) -> tuple[str, str, int, int, int]:
    """The key of one measured choice: (device name, dtype name, H, d, N)."""
    return (str(device_name), str(dtype).replace("torch.", ""), int(H), int(d), int(N))


def load_choices(path: str | os.PathLike) -> int:
    """Merge a ``choices.json`` written by ``pruneattn bench --ops`` on a GPU; returns the number of entries."""
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)["choices"]
    for e in entries:
        check_choice(f"{path}: backend", e["backend"], ATTENTION_KERNELS)
        _CHOICES[choice_key(e["device"], e["dtype"], e["H"], e["d"], e["N"])] = e["backend"]
    _choices_loaded_from.add(str(path))
    return len(entries)


@contextlib.contextmanager
def use_attention_kernel(name: str | None) -> Iterator[None]:
    """Pin the attention kernel inside the ``with`` block (``None``: back to the per-shape choice)."""
    if name is not None:
        check_choice("attention backend", name, ATTENTION_KERNELS)
    with _pinned(_forced_kernel, name):
        yield


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def attention_kernel(q: torch.Tensor, query: str) -> str:
    """``"fused"`` or ``"sdpa"`` for attention + scores on ``q`` (B, H, N, d) in the Triton backend."""
    if query != "cls":
        return "fused"
    forced = _forced_kernel.get() or os.environ.get("PRUNEATTN_ATTENTION") or None
    if forced is not None:
        check_choice("PRUNEATTN_ATTENTION", forced, ATTENTION_KERNELS)
        return forced
    path = os.environ.get("PRUNEATTN_CHOICES")
    if path and path not in _choices_loaded_from:
        load_choices(path)
    if not _CHOICES:
        return DEFAULT_ATTENTION_KERNEL
    B, H, N, d = q.shape
    return _CHOICES.get(choice_key(_device_name(q.device), q.dtype, H, d, N), DEFAULT_ATTENTION_KERNEL)


# ----------------------------------------------------------------------------- implementations


def _imported_on_call(module: str, name: str) -> Callable[..., Any]:
    """``module.name``, imported at its first call: the Triton pipeline imports Triton, which only the
    runs that use the kernels should pay for."""

    def run(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    run.__qualname__ = run.__name__ = name
    return run


# op -> backend -> implementation. attention_stats(q, k, v, *, stat, query, num_prefix, scale)
# -> (out, scores, head_mean); select_k(x, scores, k, num_prefix, fuse_weights) -> (kept, kept_idx).
# The CPU path selects with the reference's code (a sort and a gather).
IMPLEMENTATIONS: dict[str, dict[str, Callable[..., Any]]] = {
    "attention_stats": {
        "triton": _imported_on_call("pruneattn.kernels.pipeline", "attention_stats"),
        "cpu": cpu.attention_stats,
        "reference": reference.attention_stats,
    },
    "select_k": {
        "triton": _imported_on_call("pruneattn.kernels.pipeline", "select_k"),
        "cpu": reference.select_k,
        "reference": reference.select_k,
    },
}


def implementation(op: str, device: torch.device) -> Callable[..., Any]:
    """The function that runs ``op`` (a key of :data:`IMPLEMENTATIONS`) on tensors on ``device``."""
    return IMPLEMENTATIONS[op][backend_for(device)]
