"""Shared test utilities: error norms, fresh random inputs, poisoned allocations."""
from __future__ import annotations

import contextlib
import gzip
import struct
from collections.abc import Iterator

import numpy as np
import pytest
import torch

_REAL_EMPTY = torch.empty
_REAL_EMPTY_LIKE = torch.empty_like


def rel_err(x: torch.Tensor, ref: torch.Tensor, atol: float = 0.0) -> float:
    """norm(x - ref) / norm(ref) in float64 (``atol`` guards references that are all zero)."""
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / max(float(ref.norm()), atol, 1e-300))


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t.fill_(True)
    return t.fill_(torch.iinfo(t.dtype).max if t.dtype != torch.uint8 else 255)


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Fill every ``torch.empty`` / ``torch.empty_like`` with NaN (floats) or the max int (ints).

    Any output element a kernel forgets to write then shows up as NaN or a wild index.
    """
    def empty(*args, **kwargs):
        return _poison(_REAL_EMPTY(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return _poison(_REAL_EMPTY_LIKE(*args, **kwargs))

    mp = pytest.MonkeyPatch()
    mp.setattr(torch, "empty", empty)
    mp.setattr(torch, "empty_like", empty_like)
    try:
        yield
    finally:
        mp.undo()


def random_qkv(
    B: int, H: int, N: int, d: int, dtype: torch.dtype, device: torch.device, *, packed: bool = True, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh random q, k, v (B, H, N, d); ``packed`` gives timm's strided views of one qkv buffer."""
    g = torch.Generator().manual_seed(seed)
    if packed:
        qkv = torch.randn(B, N, 3, H, d, generator=g).to(device=device, dtype=dtype)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return tuple(torch.randn(B, H, N, d, generator=g).to(device=device, dtype=dtype) for _ in range(3))


def tol(dtype: torch.dtype) -> float:
    """Bound on the relative error norm: fp32 far under 1e-3, fp16/bf16 under 1e-2."""
    return 1e-5 if dtype == torch.float32 else 1e-2


def write_idx(path, array: np.ndarray, code: int, compress: bool = True) -> None:
    """Write ``array`` as an idx file (big-endian, type ``code``), gzip-compressed unless ``compress=False``."""
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(payload)
