"""Cross-head statistic of the attention each patch receives: variance, MAD or mean over heads.

One program per (block of patches, image) holds all H heads of its patches in registers, heads on
the last axis (padded to a power of two, as ``tl.sort`` needs), and writes two float32 per patch:
the score and the mean over heads (the fused token's weight). With a padding mask a padded patch
scores NaN and its mean is 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pruneattn.kernels._config import next_pow2

STAT_CODES = {"var": 0, "mad": 1, "mean": 2}


@triton.jit
def _median_last(x, H: tl.constexpr, H_PAD: tl.constexpr):
    """Median over the last axis of ``x`` (BLOCK, H_PAD) whose padding holds +inf."""
    srt = tl.sort(x, dim=1)
    idx = tl.arange(0, H_PAD)[None, :]
    lo = tl.sum(tl.where(idx == (H - 1) // 2, srt, 0.0), axis=1)
    hi = tl.sum(tl.where(idx == H // 2, srt, 0.0), axis=1)
    return (lo + hi) * 0.5


@triton.jit
def _head_statistic_kernel(
    Received, ClassLse, Scores, HeadMean, Valid,
    stride_lb, stride_lh,
    N, P, num_prefix,
    H: tl.constexpr,
    H_PAD: tl.constexpr,
    STAT: tl.constexpr,
    IS_CLS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    pid_j = tl.program_id(0)
    b = tl.program_id(1)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_h = tl.arange(0, H_PAD)
    j_ok = offs_j < P
    h_ok = offs_h < H
    ok = j_ok[:, None] & h_ok[None, :]
    rows = (b * H + offs_h) * N
    a = tl.load(Received + rows[None, :] + num_prefix + offs_j[:, None], mask=ok, other=0.0)
    if IS_CLS:
        # Received holds row 0's log2-domain logits; normalize with row 0's log2-sum-exp.
        lse0 = tl.load(ClassLse + b * stride_lb + offs_h * stride_lh, mask=h_ok, other=0.0)
        a = tl.where(ok, tl.math.exp2(a - lse0[None, :]), 0.0)
    mean = tl.sum(a, axis=1) / H
    if STAT == 0:
        dev = tl.where(ok, a - mean[:, None], 0.0)
        score = tl.sum(dev * dev, axis=1) / H
    elif STAT == 1:
        med = _median_last(tl.where(h_ok[None, :], a, float("inf")), H, H_PAD)
        dev = tl.where(h_ok[None, :], tl.abs(a - med[:, None]), float("inf"))
        score = _median_last(dev, H, H_PAD)
        score = tl.where(mean == mean, score, mean)  # NaN in a head gives NaN, as torch.quantile does
    else:
        score = mean
    if HAS_MASK:
        real = tl.load(Valid + b * N + num_prefix + offs_j, mask=j_ok, other=0) != 0
        score = tl.where(real, score, float("nan"))
        mean = tl.where(real, mean, 0.0)
    tl.store(Scores + b * P + offs_j, score, mask=j_ok)
    tl.store(HeadMean + b * P + offs_j, mean, mask=j_ok)


def head_statistic(
    received: torch.Tensor, *, stat: str, num_prefix: int, class_lse: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and head-mean attention (both (B, P) float32) from per-head rows (B, H, N) float32.

    With ``class_lse`` (B, H) float32, any strides, ``received`` holds the class row's log2-domain
    logits, normalized here with that log2-sum-exp; without it, the attention received per head.
    ``valid`` (B, N) bool: padded patches score NaN, head mean 0.
    """
    B, H, N = received.shape
    P = N - num_prefix
    scores = torch.empty((B, P), device=received.device, dtype=torch.float32)
    head_mean = torch.empty_like(scores)
    h_pad = max(2, next_pow2(H))
    block_j = max(16, min(128, next_pow2(P), 2048 // h_pad))
    is_cls = class_lse is not None
    lse = class_lse if is_cls else received  # never read without class_lse
    mask = scores if valid is None else valid.to(torch.int8).contiguous()  # never read without a mask
    _head_statistic_kernel[(triton.cdiv(P, block_j), B)](
        received, lse, scores, head_mean, mask, lse.stride(0), lse.stride(1), N, P, num_prefix,
        H=H, H_PAD=h_pad, STAT=STAT_CODES[stat], IS_CLS=is_cls, HAS_MASK=valid is not None, BLOCK_J=block_j,
    )
    return scores, head_mean
