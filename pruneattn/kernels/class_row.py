"""The class token's attention row alone: the second CUDA backend for ``query="cls"``.

With this kernel, attention + scores = SDPA (PyTorch's flash / memory-efficient kernel) for the
output, plus one small pass that computes, per (batch, head), the class token's log2-domain logits
for every key and their log2-sum-exp, feeding the same :func:`head_statistic` kernel as the fused path.

One program per (batch, head) reads q_0 (d numbers) and K once (N x d): O(B * H * N * d) work, about
1/N of the attention's. The per-lane online max / sum needs no cross-lane reduction inside the loop.
Writes: N + 1 float32 per (batch, head), the logits and the log2-sum-exp.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pruneattn.kernels._config import block_d
from pruneattn.kernels.attention import LOG2E


@triton.jit
def _class_row_kernel(
    Q, K, Logits, Lse,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    H, N, qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # padded in registers only
    q0 = tl.load(Q + b * stride_qb + h * stride_qh + offs_d * stride_qd, mask=d_ok, other=0.0).to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    row = Logits + pid * N
    m_vec = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    l_vec = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        k = tl.load(
            k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=col_ok[:, None] & d_ok[None, :], other=0.0,
        ).to(tl.float32)
        s = tl.sum(k * q0[None, :], axis=1) * qk_scale
        s = tl.where(col_ok, s, float("-inf"))
        tl.store(row + offs_n, s, mask=col_ok)
        m_new = tl.maximum(m_vec, s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_vec = l_vec * tl.math.exp2(m_vec - m_safe) + tl.math.exp2(s - m_safe)
        m_vec = m_new
    m = tl.max(m_vec, axis=0)
    l_sum = tl.sum(l_vec * tl.math.exp2(m_vec - m), axis=0)
    tl.store(Lse + pid, m + tl.math.log2(l_sum))


def class_row(q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0's log2-domain logits (B, H, N) float32 and their log2-sum-exp (B, H) float32.

    ``q``, ``k``: (B, H, N, d) views of any strides (only query row 0 of ``q`` is read).
    """
    B, H, N, D = q.shape
    logits = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    lse = torch.empty((B, H), device=q.device, dtype=torch.float32)
    width = block_d(D)
    block_n = max(8, min(64, 4096 // width))  # a (BLOCK_N, BLOCK_D) float32 tile of at most 4096 values
    _class_row_kernel[(B * H,)](
        q, k, logits, lse,
        q.stride(0), q.stride(1), q.stride(3),
        *k.stride(),
        H, N, scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=width, BLOCK_N=block_n,
    )
    return logits, lse
