"""Plain eager PyTorch reference: the executable form of ``docs/semantics.md``.

Everything here materializes the full ``(B, H, N, N)`` attention matrix on purpose: it is the
definition the fast paths are tested against, written to be read, not to be fast. The attention and
the scores are computed in float32 (float64 for float64 inputs; tests call these functions on
float64 inputs to get the truth); ``out`` is returned in q's dtype.

Non-finite values follow IEEE arithmetic of that softmax (docs/semantics.md, "Non-finite values"):
a NaN or +inf logit makes its whole attention row NaN, a -inf logit gets weight 0, NaN in v reaches
the output columns it is in. Selection ranks NaN scores as -inf; the fused token is NaN when a
dropped patch's weight is NaN or infinite.

Padding masks (``valid``, (B, N) bool, True at real tokens): a padded key gets no attention and its
values never reach an output (whatever they hold, NaN included); every query row, padded ones too,
attends over the real keys (as the unpatched models compute it); ``query="mean"`` averages over the
real queries only; a padded patch's score is NaN and its head mean 0. Selection keeps
``k_b`` real patches of image b, ranked as without a mask; padded patches rank below every real one
and are never kept; the kept indices of an image with fewer than the batch's largest ``k_b`` end in -1,
its gathered rows there are zeros.
"""
from __future__ import annotations

import torch

from pruneattn.validate import (
    check_attention_inputs,
    check_select_inputs,
    kept_per_image,
    num_kept,
)

__all__ = [
    "attention_probs",
    "attention_scores",
    "attention_stats",
    "dropped_weights",
    "head_statistic",
    "kept_mask",
    "received_attention",
    "select_k",
    "select_tokens",
    "unit_sum",
    "unit_valid",
]


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype every path computes in: float64 if one of ``dtypes`` is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, scale: float | None = None, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention weights ``A[b, h, i, j]`` of shape ``(B, H, N, N)``, in float32 (float64
    for float64 inputs) whatever the input dtype; padded keys (``valid`` (B, N) False) get weight 0."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = compute_dtype(q.dtype)
    logits = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1)


def received_attention(attn: torch.Tensor, query: str = "cls", valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head attention received by each key, ``a[b, h, j]``, from ``attn`` of shape (B, H, N, N);
    with a padding mask ``valid`` (B, N), ``"mean"`` averages over the real queries only."""
    if query == "cls":
        return attn[:, :, 0, :]
    if query == "mean":
        if valid is None:
            return attn.mean(dim=2)
        rows = attn.masked_fill(~valid[:, None, :, None], 0.0)  # a padded row's NaN must not reach the sum
        return rows.sum(dim=2) / valid.sum(dim=1).to(attn.dtype)[:, None, None]
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


def unit_sum(a: torch.Tensor, unit: int) -> torch.Tensor:
    """Received attention per selection unit: ``a`` (B, H, P) summed over each run of ``unit``
    consecutive patches -> (B, H, P / unit) (a merged token's received attention, per head)."""
    return a if unit == 1 else a.unflatten(-1, (-1, unit)).sum(dim=-1)


def unit_valid(valid: torch.Tensor | None, num_prefix: int, unit: int) -> torch.Tensor | None:
    """The (B, U) padding mask of the units after the prefix (a unit is real where its first patch is)."""
    return None if valid is None else valid[:, num_prefix::unit]


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention output ``(B, H, N, d)`` in q's dtype, float32 patch scores and float32 head-mean
    received attention (the fuse weights), both ``(B, N - num_prefix)``; computed in float32 (float64
    for float64 inputs). ``valid``: an optional (B, N) bool padding mask (see the module's docstring).
    ``unit``: score runs of that many consecutive patches as one (merged tokens): their received
    attention is summed per head before the statistic, scores and head mean are (B, (N - num_prefix) / unit)."""
    check_attention_inputs(
        q, k, v, stat=stat, query=query, num_prefix=num_prefix, scale=scale, valid=valid, unit=unit
    )
    attn = attention_probs(q, k, scale, valid)
    a = unit_sum(received_attention(attn, query, valid)[:, :, num_prefix:], unit)
    if valid is not None:  # padded values never reach an output (0 * NaN would)
        v = v.masked_fill(~valid[:, None, :, None], 0.0)
    out = (attn @ v.to(attn.dtype)).to(q.dtype)
    scores, mean = head_statistic(a, stat).float(), a.mean(dim=1).float()
    if valid is not None:
        pad = ~unit_valid(valid, num_prefix, unit)
        scores, mean = scores.masked_fill(pad, float("nan")), mean.masked_fill(pad, 0.0)
    return out, scores, mean


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
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the prefix tokens and the ``k`` highest-scoring patches, in their original order.

    Ties go to the lower index. Returns ``(kept, kept_idx)``: ``kept`` is
    ``(B, num_prefix + k [+ 1], C)``, ``kept_idx`` is ``(B, k)`` int64, ascending, indices among
    the patch tokens. In ``mode="fuse"`` one token is appended: the average of the dropped tokens
    weighted by ``fuse_weights`` (B, P) renormalized over the dropped ones (zeros if none dropped
    or their weights sum to zero; NaN if one of their weights is NaN or infinite). NaN scores rank
    as -inf. With a padding mask ``valid`` (B, N), image b keeps ``k_b`` of its real patches
    (:func:`pruneattn.validate.kept_per_image`) and ``k`` is the largest ``k_b``.
    """
    check_select_inputs(
        x, scores, keep_rate=keep_rate, k=k, num_prefix=num_prefix, mode=mode, fuse_weights=fuse_weights,
        valid=valid,
    )
    weights = fuse_weights if mode == "fuse" else None
    if valid is None:
        k = num_kept(x.shape[1] - num_prefix, keep_rate=keep_rate, k=k)
        return select_k(x, scores, k, num_prefix, weights)
    counts = kept_per_image(valid, num_prefix, keep_rate=keep_rate, k=k)
    per_image = torch.tensor(counts, dtype=torch.int64, device=x.device)
    return select_k(x, scores, max(counts), num_prefix, weights, valid, per_image)


def kept_mask(kept_idx: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(B, P) bool, True at the kept patches, from ``kept_idx`` (B, k) (entries -1 are padding)."""
    hits = torch.zeros((kept_idx.shape[0], num_patches), dtype=torch.int32, device=kept_idx.device)
    return hits.scatter_add(1, kept_idx.clamp(min=0), (kept_idx >= 0).int()) > 0


def dropped_weights(
    fuse_weights: torch.Tensor, kept_idx: torch.Tensor, dtype: torch.dtype | None = None,
    patch_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """``fuse_weights`` (B, P) zeroed at the kept patches and renormalized to sum 1 over the dropped ones.

    All zero if the dropped weights are all zero (or nothing is dropped); all NaN if one of them is
    NaN or infinite. Divided by their maximum first, so that a sum beyond the dtype's range neither
    overflows nor loses the weights. Computed in ``dtype`` (float32 by default, float64 if either
    the weights or ``dtype`` are float64). ``patch_valid`` (B, P): padded patches are never dropped
    ones (their weight is zero, whatever it was).
    """
    acc = compute_dtype(fuse_weights.dtype, dtype)
    out_of_fuse = kept_mask(kept_idx, fuse_weights.shape[1])
    if patch_valid is not None:
        out_of_fuse = out_of_fuse | ~patch_valid
    w = fuse_weights.to(acc).masked_fill(out_of_fuse, 0.0)
    top = w.amax(dim=1, keepdim=True)  # NaN if a dropped weight is NaN
    w = w / torch.where(top > 0, top, 1.0)  # inf / inf = NaN: an infinite weight poisons the token
    total = w.sum(dim=1, keepdim=True)  # in [1, P] when finite and top > 0
    return torch.where(total == 0, 0.0, w / torch.where(total == 0, 1.0, total))


def select_k(
    x: torch.Tensor, scores: torch.Tensor, k: int, num_prefix: int, fuse_weights: torch.Tensor | None,
    valid: torch.Tensor | None = None, per_image: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection with ``k`` already decided; fuses the dropped patches if ``fuse_weights`` is given.

    NaN scores rank as -inf: below every finite score, tied with -inf (ties go to the lower index).
    With a padding mask ``valid`` (B, N), image b keeps ``per_image[b]`` (B,) int64 patches, at most
    ``k``; padded patches rank below every real one.
    """
    scores = torch.where(torch.isnan(scores), float("-inf"), scores)
    # A stable sort on descending score keeps equal scores in ascending index order.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    patch_valid = None
    if valid is None:
        kept_idx = torch.sort(order[:, :k], dim=1).values
    else:
        patch_valid = valid[:, num_prefix:]
        P = scores.shape[1]
        # A second stable sort puts the real patches first, each group still in score order.
        real_first = torch.sort(patch_valid.gather(1, order).int(), dim=1, descending=True, stable=True).indices
        order = order.gather(1, real_first)[:, :k]
        slot = torch.arange(k, device=x.device)[None, :] < per_image[:, None]
        kept_idx = torch.sort(torch.where(slot, order, P), dim=1).values  # padding (P) sorts last
        kept_idx = torch.where(kept_idx == P, -1, kept_idx)
    patches = x[:, num_prefix:]
    index = kept_idx.clamp(min=0).unsqueeze(-1).expand(-1, -1, x.shape[-1])
    gathered = torch.gather(patches, 1, index)
    if valid is not None:
        gathered = gathered.masked_fill((kept_idx < 0).unsqueeze(-1), 0.0)
    parts = [x[:, :num_prefix], gathered]
    if fuse_weights is not None:
        w = dropped_weights(fuse_weights, kept_idx, x.dtype, patch_valid)
        out_of_fuse = kept_mask(kept_idx, scores.shape[1])
        if patch_valid is not None:
            out_of_fuse = out_of_fuse | ~patch_valid
        dropped = patches.to(w.dtype).masked_fill(out_of_fuse.unsqueeze(-1), 0.0)  # kept ones never enter
        no_weight = (w == 0).all(dim=1).view(-1, 1, 1)  # zero token, even beside a NaN patch
        parts.append((w.unsqueeze(1) @ dropped).masked_fill(no_weight, 0.0).to(x.dtype))
    return torch.cat(parts, dim=1), kept_idx
