"""Gather of the kept tokens and the fused token of the dropped ones, on the device.

``gather_kept`` copies the prefix tokens and the kept patches (any strides of x) into a new
contiguous (B, num_prefix + k [+ 1], C) tensor (a kept index -1, padding, gives a zero row);
``fuse_dropped`` writes the weighted average of the
dropped patches into its last row, accumulating in float32 (float64 where x or the weights are
float64). The weights are divided by the largest dropped one before they are summed, so that their
sum cannot overflow; a NaN or infinite dropped weight makes the fused token NaN, as in the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pruneattn.kernels._config import next_pow2


@triton.jit
def _gather_kernel(
    X, KeptIdx, Out,
    stride_xb, stride_xn, stride_xc,
    stride_ob, stride_on, stride_oc,
    C, k, num_prefix,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < num_prefix + k
    is_patch = offs_t >= num_prefix
    idx = tl.load(KeptIdx + b * k + (offs_t - num_prefix), mask=t_ok & is_patch, other=0)
    src = tl.where(is_patch, idx + num_prefix, offs_t)
    real = (idx >= 0) | (offs_t < num_prefix)
    for start_c in range(0, C, BLOCK_C):
        offs_c = start_c + tl.arange(0, BLOCK_C)
        ok = t_ok[:, None] & (offs_c < C)[None, :]
        row = tl.load(X + b * stride_xb + src[:, None] * stride_xn + offs_c[None, :] * stride_xc,
                      mask=ok & real[:, None], other=0.0)
        tl.store(Out + b * stride_ob + offs_t[:, None] * stride_on + offs_c[None, :] * stride_oc, row, mask=ok)


@triton.jit
def _dropped_weights(Weights, KeepMask, b, P, start_p, ACC: tl.constexpr, BLOCK_P: tl.constexpr):
    """One block of an image's weights, zero at the kept patches (and padding), and which are dropped."""
    offs_p = start_p + tl.arange(0, BLOCK_P)
    p_ok = offs_p < P
    dropped = (tl.load(KeepMask + b * P + offs_p, mask=p_ok, other=1) == 0) & p_ok
    w = tl.load(Weights + b * P + offs_p, mask=p_ok, other=0.0).to(ACC)
    return tl.where(dropped, w, 0.0), dropped, offs_p


@triton.jit
def _fuse_kernel(
    X, Weights, KeepMask, Out,
    stride_xb, stride_xn, stride_xc,
    stride_ob, stride_on, stride_oc,
    C, P, num_prefix, out_row,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    b = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    # Pass 1: the largest dropped weight (P numbers), so that the sum below stays in range.
    top = tl.zeros([BLOCK_P], dtype=ACC)
    for start_p in range(0, P, BLOCK_P):
        w, _, _ = _dropped_weights(Weights, KeepMask, b, P, start_p, ACC, BLOCK_P)
        top = tl.maximum(top, w)
    top = tl.max(top, axis=0)
    top = tl.where(top > 0, top, 1.0)  # inf stays: inf / inf = NaN poisons the token, as intended
    # Pass 2: the weighted sum of the dropped rows and of their scaled weights.
    acc = tl.zeros([BLOCK_C], dtype=ACC)
    total = tl.zeros([BLOCK_P], dtype=ACC)
    for start_p in range(0, P, BLOCK_P):
        w, dropped, offs_p = _dropped_weights(Weights, KeepMask, b, P, start_p, ACC, BLOCK_P)
        w = w / top
        rows = tl.load(
            X + b * stride_xb + (num_prefix + offs_p)[:, None] * stride_xn + offs_c[None, :] * stride_xc,
            mask=dropped[:, None] & c_ok[None, :], other=0.0,
        ).to(ACC)
        acc += tl.sum(w[:, None] * rows, axis=0)
        total += w
    wsum = tl.sum(total, axis=0)
    fused = tl.where(wsum == 0, 0.0, acc / tl.where(wsum == 0, 1.0, wsum))
    tl.store(Out + b * stride_ob + out_row * stride_on + offs_c * stride_oc, fused.to(Out.dtype.element_ty), mask=c_ok)


def gather_kept(x: torch.Tensor, kept_idx: torch.Tensor, num_prefix: int, extra_rows: int = 0) -> torch.Tensor:
    """(B, num_prefix + k + extra_rows, C): prefix tokens, then the kept patches; extra rows unset."""
    B, _, C = x.shape
    k = kept_idx.shape[1]
    out = torch.empty((B, num_prefix + k + extra_rows, C), device=x.device, dtype=x.dtype)
    block_c = max(16, min(128, next_pow2(C)))
    block_t = 16
    _gather_kernel[(triton.cdiv(num_prefix + k, block_t), B)](
        x, kept_idx, out, *x.stride(), *out.stride(), C, k, num_prefix, BLOCK_T=block_t, BLOCK_C=block_c,
    )
    return out


def fuse_dropped(
    x: torch.Tensor, weights: torch.Tensor, keep_mask: torch.Tensor, num_prefix: int, out: torch.Tensor
) -> None:
    """Write into ``out[:, -1]`` the dropped patches' average, weighted by ``weights`` renormalized."""
    B, N, C = x.shape
    P = N - num_prefix
    block_c = max(16, min(128, next_pow2(C)))
    acc = tl.float64 if torch.float64 in (x.dtype, weights.dtype) else tl.float32
    _fuse_kernel[(triton.cdiv(C, block_c), B)](
        x, weights.contiguous(), keep_mask, out, *x.stride(), *out.stride(), C, P, num_prefix,
        out.shape[1] - 1, ACC=acc, BLOCK_P=32, BLOCK_C=block_c,
    )
