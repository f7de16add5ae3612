"""Launch settings shared by the kernels: interpreter detection and autotune configs."""
from __future__ import annotations

import torch
import triton

from pruneattn._env import interpreting

# Triton's dtype for each torch dtype the kernels accept (fp64 is not supported by the kernels).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (32, 64, 128)


def configs(candidates: list[triton.Config]) -> list[triton.Config]:
    """Autotune candidates, pinned to the first one under the interpreter (nothing to tune there)."""
    return candidates[:1] if interpreting() else candidates


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))
