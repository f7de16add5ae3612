"""The Triton backend of the two ops: which kernels run, in which order, on what they hand each other.

``attention_stats``: the fused attention kernel (plus the column pass for ``query="mean"``), or SDPA
plus the class-row kernel (:func:`pruneattn.backend.attention_kernel` decides), then the head statistic.
``select_k``: top-k on the device, gather of the kept tokens, and the fused token if asked for.
Nothing is read back to the host.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pruneattn import reference
from pruneattn.backend import attention_kernel
from pruneattn.kernels import check_device, check_supported
from pruneattn.kernels.attention import attention_fwd
from pruneattn.kernels.class_row import class_row
from pruneattn.kernels.column_mean import column_mean
from pruneattn.kernels.gather import fuse_dropped, gather_kept
from pruneattn.kernels.head_statistic import head_statistic
from pruneattn.kernels.select import select_topk


def attention_stats(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, stat: str, query: str, num_prefix: int, scale: float,
    valid: torch.Tensor | None = None, unit: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, scores, head_mean) as in :func:`pruneattn.ops.attention_stats`. With a padding mask
    ``valid`` the fused kernel runs (it skips padded keys and values; SDPA would read them).
    Selection units (``unit`` > 1): the per-head received attention (B, H, N), which the kernels
    hand over anyway, is summed per unit in torch before the head-statistic kernel."""
    check_supported(q)
    if unit > 1:
        return _unit_stats(q, k, v, stat=stat, query=query, num_prefix=num_prefix, scale=scale, valid=valid, unit=unit)
    if valid is None and attention_kernel(q, query) == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        logits, lse = class_row(q, k, scale)
        scores, head_mean = head_statistic(logits, stat=stat, num_prefix=num_prefix, class_lse=lse)
        return out, scores, head_mean
    is_cls = query == "cls"
    out, lse, cls_logits = attention_fwd(q, k, v, scale, store_cls=is_cls, valid=valid)
    if is_cls:
        scores, head_mean = head_statistic(
            cls_logits, stat=stat, num_prefix=num_prefix, class_lse=lse[:, :, 0], valid=valid
        )
    else:
        received = column_mean(q, k, lse, scale, valid)
        scores, head_mean = head_statistic(received, stat=stat, num_prefix=num_prefix, valid=valid)
    return out, scores, head_mean


def _unit_stats(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, stat: str, query: str, num_prefix: int, scale: float,
    valid: torch.Tensor | None, unit: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``attention_stats`` with selection units: fused attention, received attention per head and
    token, its sums over each unit's patches, then the statistic over heads of those sums."""
    is_cls = query == "cls"
    out, lse, cls_logits = attention_fwd(q, k, v, scale, store_cls=is_cls, valid=valid)
    if is_cls:  # the class row's log2-domain logits, normalized by its log2-sum-exp
        received = torch.exp2(cls_logits - lse[:, :, :1])
        if valid is not None:
            received = received.masked_fill(~valid[:, None, :], 0.0)
    else:
        received = column_mean(q, k, lse, scale, valid)
    units = reference.unit_sum(received[:, :, num_prefix:].float(), unit).contiguous()
    scores, head_mean = head_statistic(units, stat=stat, num_prefix=0, valid=reference.unit_valid(valid, num_prefix, unit))
    return out, scores, head_mean


def select_k(
    x: torch.Tensor, scores: torch.Tensor, k: int, num_prefix: int, fuse_weights: torch.Tensor | None,
    valid: torch.Tensor | None = None, per_image: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, kept_idx) as :func:`pruneattn.reference.select_k`, on the device."""
    check_device(x)
    kept_idx, keep_mask = select_topk(scores, k, valid, per_image, num_prefix)
    kept = gather_kept(x, kept_idx, num_prefix, extra_rows=int(fuse_weights is not None))
    if fuse_weights is not None:
        fuse_dropped(x, fuse_weights, keep_mask, num_prefix, kept)
    return kept, kept_idx
