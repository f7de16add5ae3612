"""Top-k patch selection on the device, ties to the lower index, kept patches in original order.

One program per image ranks its patches by counting: rank(j) = #{i : s_i > s_j, or s_i == s_j and
i < j}; patch j is kept when rank(j) < k, and its slot in the output is the number of kept patches
before it (a running prefix sum). Everything stays on the device: no sort, no host round trip.
NaN scores are ranked as -inf (below every finite score).

With a padding mask only the real patches are ranked (and counted in ranks), image b keeps
``PerImage[b]`` of them, and its slots after those keep the -1 the host filled in; the keep mask
reads 1 at kept patches, 0 at dropped real ones, 2 at padding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pruneattn.kernels._config import next_pow2


@triton.jit
def _select_topk_kernel(
    Scores, KeptIdx, KeepMask, Valid, PerImage,
    P, k, N, num_prefix,
    HAS_MASK: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    b = tl.program_id(0)
    base = Scores + b * P
    keep_b = k
    if HAS_MASK:
        keep_b = tl.load(PerImage + b).to(tl.int32)
    running = tl.zeros([], dtype=tl.int32)
    for start_j in range(0, P, BLOCK_J):
        offs_j = start_j + tl.arange(0, BLOCK_J)
        j_ok = offs_j < P
        real_j = j_ok
        if HAS_MASK:
            real_j = j_ok & (tl.load(Valid + b * N + num_prefix + offs_j, mask=j_ok, other=0) != 0)
        s_j = tl.load(base + offs_j, mask=j_ok, other=float("-inf"))
        s_j = tl.where(s_j != s_j, float("-inf"), s_j)
        rank = tl.zeros([BLOCK_J], dtype=tl.int32)
        for start_i in range(0, P, BLOCK_I):
            offs_i = start_i + tl.arange(0, BLOCK_I)
            i_ok = offs_i < P
            if HAS_MASK:
                i_ok = i_ok & (tl.load(Valid + b * N + num_prefix + offs_i, mask=i_ok, other=0) != 0)
            s_i = tl.load(base + offs_i, mask=i_ok, other=float("-inf"))
            s_i = tl.where(s_i != s_i, float("-inf"), s_i)
            ahead = (s_i[None, :] > s_j[:, None]) | ((s_i[None, :] == s_j[:, None]) & (offs_i[None, :] < offs_j[:, None]))
            rank += tl.sum((ahead & i_ok[None, :]).to(tl.int32), axis=1)
        kept = (rank < keep_b) & real_j
        kept_i = kept.to(tl.int32)
        slot = running + tl.cumsum(kept_i, axis=0) - 1
        tl.store(KeptIdx + b * k + slot, offs_j.to(tl.int64), mask=kept)
        code = tl.where(real_j, kept_i, 2)
        tl.store(KeepMask + b * P + offs_j, code.to(tl.int8), mask=j_ok)
        running += tl.sum(kept_i, axis=0)


def select_topk(
    scores: torch.Tensor, k: int, valid: torch.Tensor | None = None, per_image: torch.Tensor | None = None,
    num_prefix: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, k) int64 ascending of the k best patches, and a (B, P) int8 keep mask.

    With a padding mask ``valid`` (B, N) over the tokens (the first ``num_prefix`` are not patches),
    image b keeps ``per_image[b]`` (B,) int64 of its real patches; its other slots are -1.
    """
    B, P = scores.shape
    scores = scores.contiguous()
    has_mask = valid is not None
    if has_mask:
        kept_idx = torch.full((B, k), -1, device=scores.device, dtype=torch.int64)
        mask, N = valid.to(torch.int8).contiguous(), valid.shape[1]
    else:
        kept_idx = torch.empty((B, k), device=scores.device, dtype=torch.int64)
        mask, per_image, N = scores, scores, P + num_prefix  # never read without a mask
    keep_mask = torch.empty((B, P), device=scores.device, dtype=torch.int8)
    block = max(16, min(128, next_pow2(P)))
    # A (BLOCK_J, BLOCK_I) comparison tile of at most 4096 values: 128 x 128 spills registers on
    # sm_80 / sm_90 (``python -m tools.gpu_build --build``); the bytes read are the same for any BLOCK_I.
    _select_topk_kernel[(B,)](
        scores, kept_idx, keep_mask, mask, per_image, P, k, N, num_prefix,
        HAS_MASK=has_mask, BLOCK_J=block, BLOCK_I=min(block, 32),
    )
    return kept_idx, keep_mask
