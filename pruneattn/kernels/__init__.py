"""Triton kernels: fused attention + per-head rows, column means, head statistics, top-k, gather.

Import this package only where the kernels run: it imports Triton.
"""
from __future__ import annotations

import torch

from pruneattn._versions import check_interpreter
from pruneattn.backend import interpreting
from pruneattn.kernels._config import KERNEL_DTYPES, MAX_HEAD_DIM, MIN_HEAD_DIM

if interpreting():
    check_interpreter()  # versions known to break Triton's CPU interpreter: refused here, with the fix


def check_supported(q: torch.Tensor) -> None:
    """Raise if the attention kernels cannot take ``q`` (dtype, head dim, device)."""
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the Triton kernels take float16, bfloat16 or float32, got {q.dtype}")
    d = q.shape[-1]
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(
            f"the Triton kernels support head dims {MIN_HEAD_DIM} to {MAX_HEAD_DIM}, got d = {d} "
            "(the CPU path takes any head dim)"
        )
    check_device(q)


def check_device(t: torch.Tensor) -> None:
    """Raise if ``t`` is on a device the kernels cannot run on right now."""
    if t.device.type == "cpu":
        if not interpreting():
            raise ValueError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before import")
        if t.dtype == torch.bfloat16:
            raise TypeError("Triton's CPU interpreter has no bfloat16; use float16/float32 or a GPU")
    elif t.device.type != "cuda":
        raise ValueError(f"the Triton kernels run on CUDA tensors, got {t.device}")
