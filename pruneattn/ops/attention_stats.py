"""``attention_stats`` / ``attention_scores``: softmax attention plus the per-patch scores.

Custom op ``pruneattn::attention_stats``. Gradients: the attention output is differentiable in q, k,
v. Its backward recomputes the attention with ``torch.nn.functional.scaled_dot_product_attention``
and differentiates that: PyTorch's tuned flash / memory-efficient backward kernels, no N x N tensor
stored, and the forward saves nothing but q, k, v (a Triton backward would save one recompute of the
forward; not written yet). Under ``create_graph=True`` (double backward, e.g. a gradient penalty) the
backward is plain softmax attention instead, differentiable again. Scores and the head-mean weights
carry no gradient (they feed a discrete choice).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from pruneattn import reference
from pruneattn.backend import implementation
from pruneattn.validate import check_attention_inputs


class AttentionStats(NamedTuple):
    """Attention output (B, H, N, d), patch scores (B, P) and head-mean received attention (B, P)."""

    out: torch.Tensor
    scores: torch.Tensor
    head_mean: torch.Tensor


def _bnhd(out: torch.Tensor) -> torch.Tensor:
    """Same values laid out as (B, N, H, d) in memory (what the kernel writes and merging heads wants)."""
    return out if out.transpose(1, 2).is_contiguous() else out.transpose(1, 2).contiguous().transpose(1, 2)


@torch.library.custom_op("pruneattn::attention_stats", mutates_args=())
def _attention_stats_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stat: str, query: str, num_prefix: int, scale: float,
    valid: torch.Tensor | None = None, unit: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    run = implementation("attention_stats", q.device)
    out, scores, head_mean = run(
        q, k, v, stat=stat, query=query, num_prefix=num_prefix, scale=scale, valid=valid, unit=unit
    )
    return _bnhd(out), scores, head_mean


@_attention_stats_op.register_fake
def _(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stat: str, query: str, num_prefix: int, scale: float,
    valid: torch.Tensor | None = None, unit: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, N, D = q.shape
    out = q.new_empty((B, N, H, D)).transpose(1, 2)
    scores = q.new_empty((B, (N - num_prefix) // unit), dtype=torch.float32)
    return out, scores, torch.empty_like(scores)


def _key_mask(valid: torch.Tensor | None) -> torch.Tensor | None:
    """SDPA's (B, 1, 1, N) boolean key mask of a padding mask (broadcast: nothing N x N)."""
    return None if valid is None else valid[:, None, None, :]


def _sdpa_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients of SDPA(q, k, v) by recomputing it with autograd on (PyTorch's fused backward)."""
    with torch.enable_grad():
        qd, kd, vd = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=_key_mask(valid), scale=scale)
        return torch.autograd.grad(out, (qd, kd, vd), grad_out)


def _differentiable_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients that are themselves differentiable (``create_graph=True``: double backward).

    Plain softmax attention in float32 (float64 for float64 inputs), differentiated with the graph
    kept: it builds the (B, H, N, N) weights, as any second-order attention gradient must, because
    PyTorch's fused SDPA backward kernels have no derivative of their own.
    """
    ins = [t if t.requires_grad else t.detach().requires_grad_(True) for t in (q, k, v)]
    acc = reference.compute_dtype(q.dtype)
    logits = (ins[0].to(acc) @ ins[1].to(acc).transpose(-2, -1)) * scale
    if valid is not None:
        logits = logits.masked_fill(~_key_mask(valid), float("-inf"))
    out = (torch.softmax(logits, dim=-1) @ ins[2].to(acc)).to(q.dtype)
    return torch.autograd.grad(out, ins, grad_out, create_graph=True)


def _setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, _stat, _query, _num_prefix, scale, valid, _unit = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(q, k, v, valid)
    ctx.scale = scale


def _backward(ctx: Any, grad_out: torch.Tensor | None, _grad_scores: Any, _grad_head_mean: Any) -> tuple:
    q, k, v, valid = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 9
    if torch.is_grad_enabled():  # backward(create_graph=True): the gradient needs a graph itself
        dq, dk, dv = _differentiable_backward(grad_out, q, k, v, ctx.scale, valid)
    else:
        dq, dk, dv = _sdpa_backward(grad_out, q, k, v, ctx.scale, valid)
    return dq, dk, dv, None, None, None, None, None, None


_attention_stats_op.register_autograd(_backward, setup_context=_setup)


def attention_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    stat: str = "var",
    query: str = "cls",
    num_prefix: int = 1,
    scale: float | None = None,
    valid: torch.Tensor | None = None,
    unit: int = 1,
) -> AttentionStats:
    """Attention output, patch scores and head-mean received attention (the fuse weights).

    Like :func:`attention_scores`, plus ``head_mean`` (B, N - num_prefix) float32: the received
    attention of each patch averaged over heads (the class token's for ``query="cls"``); 0 at padding.

    ``unit``: score merged tokens instead of patches (Qwen2.5-VL's tower merges each run of 4
    consecutive tokens into one language-model token): the patches after the prefix form runs of
    ``unit``, each run's received attention is summed per head, and its score is the statistic over
    heads of that sum. ``scores`` and ``head_mean`` are then (B, (N - num_prefix) / unit); under a
    padding mask a unit is all real or all padding.
    """
    check_attention_inputs(
        q, k, v, stat=stat, query=query, num_prefix=num_prefix, scale=scale, valid=valid, unit=unit
    )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return AttentionStats(
        *torch.ops.pruneattn.attention_stats(q, k, v, stat, query, num_prefix, scale, valid, int(unit))
    )


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    stat: str = "var",
    query: str = "cls",
    num_prefix: int = 1,
    scale: float | None = None,
    valid: torch.Tensor | None = None,
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
        valid: padding mask (B, N) bool, True at the real tokens (images of different sizes padded to
            one length). Padded keys get no attention and their values never reach an output; every
            row, padded ones too, attends over the real keys; ``query="mean"`` averages over the real
            queries; padded patches score NaN (never kept by :func:`pruneattn.select_tokens` given
            the same mask). The prefix tokens must be real. Nothing N x N is built for it.

    Returns:
        ``out`` (B, H, N, d) in q's dtype and ``scores`` (B, N - num_prefix) float32, whatever the
        input dtype. Only ``out`` carries a gradient. NaN in the inputs gives NaN in both
        outputs, which :func:`pruneattn.select_tokens` then rejects.
    """
    res = attention_stats(q, k, v, stat=stat, query=query, num_prefix=num_prefix, scale=scale, valid=valid)
    return res.out, res.scores
