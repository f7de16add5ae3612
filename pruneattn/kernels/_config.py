"""Launch settings shared by the kernels: interpreter detection and autotune configs."""
from __future__ import annotations

import torch
import triton

from pruneattn._env import interpreting

# Triton's dtype for each torch dtype the kernels accept (fp64 is not supported by the kernels).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Every head dim in [MIN_HEAD_DIM, MAX_HEAD_DIM] runs: the kernels pad it to a power of two of at least
# 16 (what ``tl.dot`` needs) in registers only, with masked loads and stores.
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


def configs(candidates: list[triton.Config]) -> list[triton.Config]:
    """Autotune candidates, pinned to the first one under the interpreter (nothing to tune there)."""
    return candidates[:1] if interpreting() else candidates


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def block_d(head_dim: int) -> int:
    """The register width of a head dim: the next power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, next_pow2(head_dim))
