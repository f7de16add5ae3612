"""Functional layer: validated public ops, registered as torch custom ops, dispatched in one place.

``attention_scores`` / ``attention_stats`` and ``select_tokens`` check their arguments, then call a
``torch.library`` custom op (opaque to ``torch.compile``, so no graph break) whose implementation
runs the backend chosen by :func:`pruneattn.backend.implementation`.

Gradients: the attention output is differentiable in q, k, v. Its backward recomputes the attention
with ``torch.nn.functional.scaled_dot_product_attention`` and differentiates that: PyTorch's tuned
flash / memory-efficient backward kernels, no N x N tensor stored, and the forward saves nothing but
q, k, v (a Triton backward would save one recompute of the forward; not written yet). Under
``create_graph=True`` (double backward, e.g. a gradient penalty) the backward is plain softmax
attention instead, differentiable again. Scores, the
head-mean weights and kept indices carry no gradient (the selection is a discrete choice). Kept and
fused tokens are differentiable in ``x``; the fuse weights are treated as constants.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from pruneattn import reference
from pruneattn.backend import implementation
from pruneattn.validate import check_attention_inputs, check_select_inputs, check_split_inputs, num_kept


class AttentionStats(NamedTuple):
    """Attention output (B, H, N, d), patch scores (B, P) and head-mean received attention (B, P)."""

    out: torch.Tensor
    scores: torch.Tensor
    head_mean: torch.Tensor


# ----------------------------------------------------------------------------- attention + scores


def _bnhd(out: torch.Tensor) -> torch.Tensor:
    """Same values laid out as (B, N, H, d) in memory (what the kernel writes and merging heads wants)."""
    return out if out.transpose(1, 2).is_contiguous() else out.transpose(1, 2).contiguous().transpose(1, 2)


@torch.library.custom_op("pruneattn::attention_stats", mutates_args=())
def _attention_stats_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stat: str, query: str, num_prefix: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    run = implementation("attention_stats", q.device)
    out, scores, head_mean = run(q, k, v, stat=stat, query=query, num_prefix=num_prefix, scale=scale)
    return _bnhd(out), scores, head_mean


@_attention_stats_op.register_fake
def _(q, k, v, stat, query, num_prefix, scale):
    B, H, N, D = q.shape
    out = q.new_empty((B, N, H, D)).transpose(1, 2)
    scores = q.new_empty((B, N - num_prefix), dtype=torch.float32)
    return out, scores, torch.empty_like(scores)


def _sdpa_backward(grad_out, q, k, v, scale):
    """Gradients of SDPA(q, k, v) by recomputing it with autograd on (PyTorch's fused backward)."""
    with torch.enable_grad():
        qd, kd, vd = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qd, kd, vd, scale=scale)
        return torch.autograd.grad(out, (qd, kd, vd), grad_out)


def _differentiable_backward(grad_out, q, k, v, scale):
    """Gradients that are themselves differentiable (``create_graph=True``: double backward).

    Plain softmax attention in float32 (float64 for float64 inputs), differentiated with the graph
    kept: it builds the (B, H, N, N) weights, as any second-order attention gradient must, because
    PyTorch's fused SDPA backward kernels have no derivative of their own.
    """
    ins = [t if t.requires_grad else t.detach().requires_grad_(True) for t in (q, k, v)]
    acc = reference.compute_dtype(q.dtype)
    attn = torch.softmax((ins[0].to(acc) @ ins[1].to(acc).transpose(-2, -1)) * scale, dim=-1)
    out = (attn @ ins[2].to(acc)).to(q.dtype)
    return torch.autograd.grad(out, ins, grad_out, create_graph=True)


def _attention_setup(ctx, inputs, output):
    q, k, v, _stat, _query, _num_prefix, scale = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(q, k, v)
    ctx.scale = scale


def _attention_backward(ctx, grad_out, _grad_scores, _grad_head_mean):
    q, k, v = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 7
    if torch.is_grad_enabled():  # backward(create_graph=True): the gradient needs a graph itself
        dq, dk, dv = _differentiable_backward(grad_out, q, k, v, ctx.scale)
    else:
        dq, dk, dv = _sdpa_backward(grad_out, q, k, v, ctx.scale)
    return dq, dk, dv, None, None, None, None


_attention_stats_op.register_autograd(_attention_backward, setup_context=_attention_setup)


def attention_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    stat: str = "var",
    query: str = "cls",
    num_prefix: int = 1,
    scale: float | None = None,
) -> AttentionStats:
    """Attention output, patch scores and head-mean received attention (the fuse weights).

    Like :func:`attention_scores`, plus ``head_mean`` (B, N - num_prefix) float32: the received
    attention of each patch averaged over heads (the class token's for ``query="cls"``).
    """
    check_attention_inputs(q, k, v, stat=stat, query=query, num_prefix=num_prefix, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return AttentionStats(*torch.ops.pruneattn.attention_stats(q, k, v, stat, query, num_prefix, scale))


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
    """Softmax attention of q, k, v (B, H, N, d) and the per-patch attention-diversity scores.

    Args:
        q, k, v: (B, H, N, d), one dtype and device; any strides (timm's packed qkv views are read
            without a copy by the kernels).
        stat: ``"var"`` (population variance over heads), ``"mad"`` (median absolute deviation over
            heads) or ``"mean"`` (mean over heads, EViT's score).
        query: ``"cls"`` scores the class token's attention row, ``"mean"`` the attention averaged
            over all queries.
        num_prefix: leading tokens (class, distillation, registers) that get no score.
        scale: logit scale, ``d ** -0.5`` by default.

    Returns:
        ``out`` (B, H, N, d) in q's dtype and ``scores`` (B, N - num_prefix) float32, whatever the
        input dtype. Only ``out`` carries a gradient. NaN in the inputs gives NaN in both
        outputs, which :func:`select_tokens` then rejects.
    """
    res = attention_stats(q, k, v, stat=stat, query=query, num_prefix=num_prefix, scale=scale)
    return res.out, res.scores


def split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views q, k, v (B, H, N, d) of a packed (B, N, 3 * H * d) projection, as timm lays it out."""
    check_split_inputs(qkv, num_heads)
    B, N, _ = qkv.shape
    return qkv.reshape(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


# ----------------------------------------------------------------------------- selection + gather


@torch.library.custom_op("pruneattn::select_tokens", mutates_args=())
def _select_tokens_op(
    x: torch.Tensor, scores: torch.Tensor, k: int, num_prefix: int, fuse_weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return implementation("select_k", x.device)(x, scores, k, num_prefix, fuse_weights)


@_select_tokens_op.register_fake
def _(x, scores, k, num_prefix, fuse_weights):
    B, _, C = x.shape
    rows = num_prefix + k + int(fuse_weights is not None)
    return x.new_empty((B, rows, C)), x.new_empty((B, k), dtype=torch.int64)


def _select_setup(ctx, inputs, output):
    x, _scores, _k, num_prefix, fuse_weights = inputs
    ctx.save_for_backward(output[1], fuse_weights)
    ctx.num_prefix = num_prefix
    ctx.x_shape = x.shape


def _select_backward(ctx, grad_kept, _grad_idx):
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


_select_tokens_op.register_autograd(_select_backward, setup_context=_select_setup)


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


__all__ = ["AttentionStats", "attention_stats", "attention_scores", "select_tokens", "split_qkv"]
