"""``select_tokens``: keep the prefix tokens and the k best patches, optionally fuse the others.

Custom op ``pruneattn::select_tokens``. Kept and fused tokens are differentiable in ``x``; kept
indices carry no gradient (the selection is a discrete choice) and the fuse weights are treated as
constants.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pruneattn import reference
from pruneattn.backend import implementation
from pruneattn.validate import check_select_inputs, check_valid, kept_per_image, num_kept


@torch.library.custom_op("pruneattn::select_tokens", mutates_args=())
def _select_tokens_op(
    x: torch.Tensor, scores: torch.Tensor, k: int, num_prefix: int, fuse_weights: torch.Tensor | None,
    valid: torch.Tensor | None = None, per_image: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    run = implementation("select_k", x.device)
    if valid is None:
        return run(x, scores, k, num_prefix, fuse_weights)
    return run(x, scores, k, num_prefix, fuse_weights, valid, per_image)


@_select_tokens_op.register_fake
def _(
    x: torch.Tensor, scores: torch.Tensor, k: int, num_prefix: int, fuse_weights: torch.Tensor | None,
    valid: torch.Tensor | None = None, per_image: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, _, C = x.shape
    rows = num_prefix + k + int(fuse_weights is not None)
    return x.new_empty((B, rows, C)), x.new_empty((B, k), dtype=torch.int64)


def _setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, _scores, _k, num_prefix, fuse_weights, valid, _per_image = inputs
    ctx.save_for_backward(output[1], fuse_weights, valid)
    ctx.num_prefix = num_prefix
    ctx.x_shape = x.shape


def _backward(ctx: Any, grad_kept: torch.Tensor, _grad_idx: Any) -> tuple:
    kept_idx, fuse_weights, valid = ctx.saved_tensors
    p, k = ctx.num_prefix, kept_idx.shape[1]
    grad_x = grad_kept.new_zeros(ctx.x_shape)
    grad_x[:, :p] = grad_kept[:, :p]
    index = kept_idx.clamp(min=0).unsqueeze(-1).expand(-1, -1, grad_x.shape[-1])
    grad_rows = grad_kept[:, p : p + k]
    if valid is not None:  # padding rows (index -1) came from no token
        grad_rows = grad_rows.masked_fill((kept_idx < 0).unsqueeze(-1), 0.0)
    grad_patches = grad_x[:, p:].scatter_add(1, index, grad_rows)
    if fuse_weights is not None:
        patch_valid = None if valid is None else valid[:, p:]
        w = reference.dropped_weights(fuse_weights, kept_idx, grad_kept.dtype, patch_valid)
        grad_patches = grad_patches + w.unsqueeze(-1).to(grad_kept.dtype) * grad_kept[:, -1:]
    grad_x[:, p:] = grad_patches
    return grad_x, None, None, None, None, None, None


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
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the prefix tokens and the k highest-scoring patches of ``x`` (B, N, C), in order.

    Exactly one of ``keep_rate`` (k = ceil(keep_rate * P), P = N - num_prefix) and ``k``. Ties go
    to the lower index. ``mode="fuse"`` appends the average of the dropped patches weighted by
    ``fuse_weights`` (B, P), e.g. ``attention_stats(...).head_mean``, renormalized over the dropped
    ones (a zero token if nothing is dropped). NaN scores rank lowest, on every device.

    ``valid`` (B, N) bool, True at the real tokens (a padding mask, as given to
    :func:`pruneattn.attention_stats`): image b keeps k_b = ceil(keep_rate * P_b) of its P_b real
    patches (at least 1; ``k``: at most k), padded patches are never kept, and the output is as wide
    as the largest k_b: an image that keeps fewer has zero rows and kept index -1 after its own
    (:func:`valid_after` gives the mask of the result). The k_b are counted on the host, one device
    sync per call on a GPU.

    Returns ``kept`` (B, num_prefix + k [+ 1], C) and ``kept_idx`` (B, k) int64 ascending, the
    indices of the kept patches among the patch tokens.
    """
    check_select_inputs(
        x, scores, keep_rate=keep_rate, k=k, num_prefix=num_prefix, mode=mode, fuse_weights=fuse_weights,
        valid=valid,
    )
    weights = fuse_weights if mode == "fuse" else None
    if valid is None:
        k = num_kept(x.shape[1] - num_prefix, keep_rate=keep_rate, k=k)
        return torch.ops.pruneattn.select_tokens(x, scores, k, num_prefix, weights)
    return select_per_image(x, scores, kept_per_image(valid, num_prefix, keep_rate=keep_rate, k=k),
                            num_prefix=num_prefix, fuse_weights=weights, valid=valid)


def select_per_image(
    x: torch.Tensor, scores: torch.Tensor, counts: Sequence[int], *, num_prefix: int,
    fuse_weights: torch.Tensor | None, valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select_tokens` under a padding mask with the number of patches each image keeps given
    (``counts``, one int per image, each at most its real patches; the arguments are checked by the
    caller). Fuses the dropped real patches when ``fuse_weights`` is given."""
    per_image = torch.tensor(list(counts), dtype=torch.int64).to(x.device, non_blocking=True)
    return torch.ops.pruneattn.select_tokens(
        x, scores, max(counts, default=0), num_prefix, fuse_weights, valid, per_image
    )


def valid_after(valid: torch.Tensor, kept_idx: torch.Tensor, num_prefix: int, fused: bool = False) -> torch.Tensor:
    """The padding mask of :func:`select_tokens`'s output: the prefix as in ``valid`` (B, N), then
    ``kept_idx >= 0``, then True for the fused token if ``fused``."""
    check_valid(valid, (kept_idx.shape[0], valid.shape[1]), kept_idx.device, num_prefix)
    parts = [valid[:, :num_prefix], kept_idx >= 0]
    if fused:
        parts.append(valid.new_ones((valid.shape[0], 1)))
    return torch.cat(parts, dim=1)
