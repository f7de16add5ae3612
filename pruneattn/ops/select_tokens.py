"""``select_tokens``: keep the prefix tokens and the k best patches, optionally fuse the others.

Custom op ``pruneattn::select_tokens``. Kept and fused tokens are differentiable in ``x``; kept
indices carry no gradient (the selection is a discrete choice) and the fuse weights are treated as
constants.
"""
from __future__ import annotations

from typing import Any

import torch

from pruneattn import reference
from pruneattn.backend import implementation
from pruneattn.validate import check_select_inputs, num_kept


@torch.library.custom_op("pruneattn::select_tokens", mutates_args=())
def _select_tokens_op(
    x: torch.Tensor, scores: torch.Tensor, k: int, num_prefix: int, fuse_weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return implementation("select_k", x.device)(x, scores, k, num_prefix, fuse_weights)


@_select_tokens_op.register_fake
def _(
    x: torch.Tensor, scores: torch.Tensor, k: int, num_prefix: int, fuse_weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    B, _, C = x.shape
    rows = num_prefix + k + int(fuse_weights is not None)
    return x.new_empty((B, rows, C)), x.new_empty((B, k), dtype=torch.int64)


def _setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, _scores, _k, num_prefix, fuse_weights = inputs
    ctx.save_for_backward(output[1], fuse_weights)
    ctx.num_prefix = num_prefix
    ctx.x_shape = x.shape


def _backward(ctx: Any, grad_kept: torch.Tensor, _grad_idx: Any) -> tuple:
    kept_idx, fuse_weights = ctx.saved_tensors
    p, k = ctx.num_prefix, kept_idx.shape[1]
    grad_x = grad_kept.new_zeros(ctx.x_shape)
    grad_x[:, :p] = grad_kept[:, :p]
    index = kept_idx.unsqueeze(-1).expand(-1, -1, grad_x.shape[-1])
    grad_patches = grad_x[:, p:].scatter(1, index, grad_kept[:, p : p + k])
    if fuse_weights is not None:
        w = reference.dropped_weights(fuse_weights, kept_idx, grad_kept.dtype)
        grad_patches = grad_patches + w.unsqueeze(-1).to(grad_kept.dtype) * grad_kept[:, -1:]
    grad_x[:, p:] = grad_patches
    return grad_x, None, None, None, None


_select_tokens_op.register_autograd(_backward, setup_context=_setup)


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
    """Keep the prefix tokens and the k highest-scoring patches of ``x`` (B, N, C), in order.

    Exactly one of ``keep_rate`` (k = ceil(keep_rate * P), P = N - num_prefix) and ``k``. Ties go
    to the lower index. ``mode="fuse"`` appends the average of the dropped patches weighted by
    ``fuse_weights`` (B, P), e.g. ``attention_stats(...).head_mean``, renormalized over the dropped
    ones (a zero token if nothing is dropped). On CPU tensors non-finite scores or weights raise
    ValueError; on GPU tensors and under torch.compile the values are not checked (that would need a
    host sync per call): NaN scores then rank lowest.

    Returns ``kept`` (B, num_prefix + k [+ 1], C) and ``kept_idx`` (B, k) int64 ascending, the
    indices of the kept patches among the patch tokens.
    """
    check_select_inputs(
        x, scores, keep_rate=keep_rate, k=k, num_prefix=num_prefix, mode=mode, fuse_weights=fuse_weights
    )
    k = num_kept(x.shape[1] - num_prefix, keep_rate=keep_rate, k=k)
    kept, kept_idx = torch.ops.pruneattn.select_tokens(
        x, scores, k, num_prefix, fuse_weights if mode == "fuse" else None
    )
    return kept, kept_idx
