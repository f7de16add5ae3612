"""Plain eager PyTorch reference: the executable form of ``docs/semantics.md``.

Everything here materializes the full ``(B, H, N, N)`` attention matrix on purpose: it is the
definition the fast paths are tested against, written to be read, not to be fast. Computations
are done in the input dtype; tests call these functions on float64 inputs to get the truth.
"""
from __future__ import annotations

import torch

from pruneattn.validate import (
    check_attention_inputs,
    check_select_inputs,
    num_kept,
)

__all__ = [
    "attention_probs",
    "attention_scores",
    "attention_stats",
    "dropped_weights",
    "head_statistic",
    "received_attention",
    "select_k",
    "select_tokens",
]


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Softmax attention weights ``A[b, h, i, j]`` of shape ``(B, H, N, N)``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)


def received_attention(attn: torch.Tensor, query: str = "cls") -> torch.Tensor:
    """Per-head attention received by each key, ``a[b, h, j]``, from ``attn`` of shape (B, H, N, N)."""
    if query == "cls":
        return attn[:, :, 0, :]
    if query == "mean":
        return attn.mean(dim=2)
    raise ValueError(f"query must be 'cls' or 'mean', got {query!r}")


def head_statistic(a: torch.Tensor, stat: str = "var") -> torch.Tensor:
    """Statistic over the heads (dim 1) of ``a`` of shape (B, H, P) -> (B, P).

    ``var``: population variance; ``mad``: median absolute deviation from the median, with the
    median of an even count being the mean of the two middle values; ``mean``: mean over heads.
    """
    if stat == "var":
        return a.var(dim=1, unbiased=False)
    if stat == "mean":
        return a.mean(dim=1)
    if stat == "mad":
        med = torch.quantile(a, 0.5, dim=1, keepdim=True)
        return torch.quantile((a - med).abs(), 0.5, dim=1)
    raise ValueError(f"stat must be 'var', 'mad' or 'mean', got {stat!r}")


def attention_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    stat: str = "var",
    query: str = "cls",
    num_prefix: int = 1,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention output ``(B, H, N, d)``, float32 patch scores and float32 head-mean received
    attention (the fuse weights), both ``(B, N - num_prefix)``."""
    check_attention_inputs(q, k, v, stat=stat, query=query, num_prefix=num_prefix, scale=scale)
    attn = attention_probs(q, k, scale)
    a = received_attention(attn, query)[:, :, num_prefix:]
    return attn @ v, head_statistic(a, stat).float(), a.mean(dim=1).float()


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    stat: str = "var",
    query: str = "cls",
    num_prefix: int = 1,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output ``(B, H, N, d)`` and float32 patch scores ``(B, N - num_prefix)``.

    Scores are float32 whatever the input dtype (the spec); for a float64 truth call
    :func:`head_statistic` on :func:`received_attention` directly.
    """
    out, scores, _ = attention_stats(q, k, v, stat=stat, query=query, num_prefix=num_prefix, scale=scale)
    return out, scores


def select_tokens(
    x: torch.Tensor,
    scores: torch.Tensor,
    *,
    keep_rate: float | None = None,
    k: int | None = None,
    num_prefix: int = 1,
    mode: str = "drop",
    fuse_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the prefix tokens and the ``k`` highest-scoring patches, in their original order.

    Ties go to the lower index. Returns ``(kept, kept_idx)``: ``kept`` is
    ``(B, num_prefix + k [+ 1], C)``, ``kept_idx`` is ``(B, k)`` int64, ascending, indices among
    the patch tokens. In ``mode="fuse"`` one token is appended: the average of the dropped tokens
    weighted by ``fuse_weights`` (B, P) renormalized over the dropped ones (zeros if none dropped
    or their weights sum to zero).
    """
    check_select_inputs(
        x, scores, keep_rate=keep_rate, k=k, num_prefix=num_prefix, mode=mode, fuse_weights=fuse_weights
    )
    k = num_kept(x.shape[1] - num_prefix, keep_rate=keep_rate, k=k)
    return select_k(x, scores, k, num_prefix, fuse_weights if mode == "fuse" else None)


def dropped_weights(fuse_weights: torch.Tensor, kept_idx: torch.Tensor) -> torch.Tensor:
    """``fuse_weights`` (B, P) zeroed at the kept patches and renormalized to sum 1 (0 if all zero)."""
    acc = torch.float64 if fuse_weights.dtype == torch.float64 else torch.float32
    w = fuse_weights.to(acc).scatter(1, kept_idx, 0.0)
    total = w.sum(dim=1, keepdim=True)
    return torch.where(total > 0, w / torch.where(total > 0, total, 1.0), 0.0)


def select_k(
    x: torch.Tensor, scores: torch.Tensor, k: int, num_prefix: int, fuse_weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection with ``k`` already decided; fuses the dropped patches if ``fuse_weights`` is given.

    NaN scores (reachable only where the finiteness check is skipped) rank as -inf.
    """
    scores = torch.where(torch.isnan(scores), float("-inf"), scores)
    # A stable sort on descending score keeps equal scores in ascending index order.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    kept_idx = torch.sort(order[:, :k], dim=1).values
    patches = x[:, num_prefix:]
    gathered = torch.gather(patches, 1, kept_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    parts = [x[:, :num_prefix], gathered]
    if fuse_weights is not None:
        w = dropped_weights(fuse_weights, kept_idx)
        acc = torch.promote_types(w.dtype, x.dtype)
        parts.append((w.to(acc).unsqueeze(1) @ patches.to(acc)).to(x.dtype))
    return torch.cat(parts, dim=1), kept_idx
