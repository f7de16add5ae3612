"""Fused forward attention that also emits what the patch scores need, in one pass over Q, K, V.

Every head dim from 16 to 256: ``HEAD_DIM`` is the real d, ``BLOCK_D`` its power-of-two register width
(at least 16, as ``tl.dot`` needs); the padding lanes are masked on every load and store.

One program per (query block, batch * head), FlashAttention-2 style online softmax in the log2
domain. Besides the output it writes, per (batch, head, row), the row's log2-sum-exp, and the
programs holding query row 0 (the class token) write that row's log2-domain logits for every key.
No N x N tensor is ever stored: the extra writes are two float32 per (batch, head, token).

With a padding mask (``HAS_MASK``: one int8 per (batch, token), nonzero at real tokens) padded keys
and values are not loaded (zeros stand in, so whatever they hold never reaches a result) and their
logits are -inf; every query row, padded ones too, attends over the real keys. A key block with no
real key leaves the running maximum at -inf, so the exponentials are then taken against 0 instead.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pruneattn.kernels._config import (
    FP32_ATTENTION_CONFIGS, FP32_ATTENTION_TILE, HALF_ATTENTION_TILE, attention_smem, block_d, configs, prune_by,
)

LOG2E = math.log2(math.e)

_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
]


@triton.autotune(
    configs=configs(_CONFIGS + FP32_ATTENTION_CONFIGS), key=["N", "H", "HEAD_DIM", "DTYPE_KEY"],
    prune_configs_by=prune_by(attention_smem, FP32_ATTENTION_CONFIGS, FP32_ATTENTION_TILE, HALF_ATTENTION_TILE),
)
@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Out, Lse, ClsLogits, Valid,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N, qk_scale,
    DTYPE_KEY: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STORE_CLS: tl.constexpr,
    IEEE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM  # the head dim padded to BLOCK_D in registers only: zeros add nothing
    row_ok = offs_m < N

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        if HAS_MASK:
            col_ok = col_ok & (tl.load(Valid + b * N + offs_n, mask=col_ok, other=0) != 0)
        k = tl.load(
            k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=col_ok[None, :] & d_ok[:, None], other=0.0,
        )
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = tl.where(col_ok[None, :], s * qk_scale, float("-inf"))
        if STORE_CLS:
            if pid_m == 0:
                cls_row = tl.sum(tl.where(offs_m[:, None] == 0, s, 0.0), axis=0)
                tl.store(ClsLogits + pid_bh * N + offs_n, cls_row, mask=offs_n < N)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        if HAS_MASK:  # no real key yet: -inf - -inf would be NaN
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_ref = m_new
        alpha = tl.math.exp2(m_i - m_ref)
        p = tl.math.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=col_ok[:, None] & d_ok[None, :], other=0.0,
        )
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + pid_bh * N + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, store_cls: bool,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the fused forward on (B, H, N, d) views of any strides.

    Returns ``out`` (B, H, N, d) in q's dtype (a view of a (B, N, H, d) buffer, so that merging the
    heads afterwards is free), ``lse`` (B, H, N) float32 log2-sum-exp of each row's log2-domain
    logits, and, if ``store_cls``, ``cls_logits`` (B, H, N) float32: row 0's log2-domain logits
    (-inf at padded keys). ``valid``: a (B, N) bool padding mask, or None.
    """
    B, H, N, D = q.shape
    out = torch.empty((B, N, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    cls_logits = torch.empty((B, H, N), device=q.device, dtype=torch.float32) if store_cls else None
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)  # noqa: E731
    mask = lse if valid is None else valid.to(torch.int8).contiguous()  # never read without a mask
    _attention_fwd_kernel[grid](
        q, k, v, out, lse, cls_logits if store_cls else lse, mask,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, N, scale * LOG2E,
        DTYPE_KEY=str(q.dtype), HEAD_DIM=D, BLOCK_D=block_d(D), STORE_CLS=store_cls, IEEE=q.dtype == torch.float32,
        HAS_MASK=valid is not None,
    )
    return out, lse, cls_logits
