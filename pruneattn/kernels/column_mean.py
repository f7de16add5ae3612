"""Attention received by each key averaged over all queries (``query="mean"``): a second pass.

One program per (key block, batch * head) loops over every query block, recomputes the logits and
normalizes them with the log2-sum-exp the forward saved, and sums columns in registers: no atomics,
no N x N tensor. It reads Q, K and the row statistics, not V; its cost is one more Q K^T.
With a padding mask the sums take the real queries only (a padded query is not loaded and its row
statistic stands at +inf) and are divided by their number; padded keys' columns are written as they
come (the head statistic scores them NaN).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pruneattn.kernels._config import FP32_COLUMN_CONFIGS, block_d, column_smem, configs, prune_by
from pruneattn.kernels.attention import LOG2E

_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=3),
]


@triton.autotune(configs=configs(_CONFIGS + FP32_COLUMN_CONFIGS), key=["N", "H", "HEAD_DIM", "DTYPE_KEY"],
                 prune_configs_by=prune_by(column_smem, FP32_COLUMN_CONFIGS))
@triton.jit
def _column_mean_kernel(
    Q, K, Lse, Received, Valid, InvCount,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    H, N, qk_scale, inv_n,
    DTYPE_KEY: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # padded in registers only
    col_ok = offs_n < N
    k = tl.load(
        K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
        mask=col_ok[None, :] & d_ok[:, None], other=0.0,
    )
    q_base = Q + b * stride_qb + h * stride_qh
    colsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        if HAS_MASK:
            row_ok = row_ok & (tl.load(Valid + b * N + offs_m, mask=row_ok, other=0) != 0)
        q = tl.load(
            q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        )
        # Rows past N (and padded rows) get lse = +inf, hence p = 0.
        lse = tl.load(Lse + pid_bh * N + offs_m, mask=row_ok, other=float("inf"))
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        colsum += tl.sum(p, axis=0)
    if HAS_MASK:
        inv_n = tl.load(InvCount + b)
    tl.store(Received + pid_bh * N + offs_n, colsum * inv_n, mask=col_ok)


def column_mean(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """``(1/N) * sum_i A[b, h, i, j]`` as (B, H, N) float32, from the forward's log2-sum-exp; with a
    padding mask ``valid`` (B, N), the mean over each image's real queries i."""
    B, H, N, D = q.shape
    received = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    if valid is None:
        mask = inv_count = lse  # never read without a mask
    else:
        mask = valid.to(torch.int8).contiguous()
        inv_count = valid.sum(dim=1, dtype=torch.float32).reciprocal_()
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), B * H)  # noqa: E731
    _column_mean_kernel[grid](
        q, k, lse, received, mask, inv_count, *q.stride(), *k.stride(), H, N, scale * LOG2E, 1.0 / N,
        DTYPE_KEY=str(q.dtype), HEAD_DIM=D, BLOCK_D=block_d(D), IEEE=q.dtype == torch.float32,
        HAS_MASK=valid is not None,
    )
    return received
