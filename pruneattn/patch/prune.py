"""The pruning step every patched block shares: scoring attention, selection, the fused token.

A patched block runs ``x = x + attn(norm1(x))`` over all N tokens with :func:`attention`, then
:func:`prune_tokens` keeps the prefix tokens and the top-k patches, then the MLP on the kept tokens.

Fused token across several pruning blocks (``mode="fuse"``):

- The fused token is appended last and is not a patch candidate in later blocks: k = ceil(rate * P)
  with P the real patches only (no prefix, no fused token), and kept indices are pure patch indices.
- It takes part in attention like any token.
- At the next pruning block the old fused token is merged into the new one: the new fused token is
  the average of the newly dropped patches *and* the old fused token, each weighted by its head-mean
  received attention in that block, renormalized. (Done in one selection call: the old fused token
  joins the candidates last, with score -inf, so it is always dropped, even beside NaN scores.)
- ``tokens=k`` keeps exactly k patches per image (k must not exceed the block's patch count); a block
  given ``tokens`` always runs selection, as one with a keep rate below 1 does.
- A block with keep rate 1.0 drops nothing and passes every token through unchanged (no fused token
  is created there, an existing one is carried as is), so ``keep_rate=1.0`` reproduces the model.

Padded encoders (images of different sizes in one batch, :func:`prune_padded`): the block's padding
mask goes into the attention; image b keeps k_b = ceil(rate * P_b) of its P_b real patches
(``tokens=k``: min(k, P_b)); the batch is as wide as the largest k_b, shorter images padded, and the
mask after the block marks what is real. Kept indices hold -1 at padding slots.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pruneattn.ops import AttentionStats, attention_stats, select_per_image, select_tokens, valid_after
from pruneattn.patch.state import BlockConfig, current
from pruneattn.validate import kept_per_image


def check_traceable(x: object) -> None:
    """Refuse ``torch.fx`` symbolic tracing with a reason (selection needs the real token count)."""
    if isinstance(x, torch.fx.Proxy):
        raise TypeError(
            "pruneattn: a patched model cannot be traced by torch.fx symbolic tracing (e.g. "
            "create_feature_extractor): the number of kept tokens is computed from the input's shape. "
            "Use torch.compile, torch.export or torch.jit.trace, or read features with "
            "forward_intermediates / output_hidden_states"
        )


def block_kept(cfg: BlockConfig, num_patches: int) -> int:
    """How many of the block's ``num_patches`` patches it keeps (:meth:`BlockConfig.kept`), where all images
    have them all: ``tokens`` above that count is refused, not cut."""
    if cfg.tokens is not None and cfg.tokens > num_patches:
        raise ValueError(
            f"pruneattn: block {cfg.layer} was told to keep tokens={cfg.tokens} patches but its input has only "
            f"{num_patches}; patch with a smaller tokens= (or keep_rate=) for this input size"
        )
    return cfg.kept(num_patches)


def attention(
    cfg: BlockConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    valid: torch.Tensor | None = None, dropout: float = 0.0,
) -> AttentionStats:
    """Attention output (B, H, N, d) and the scores of every token after the prefix (fused one included);
    ``valid``: the (B, N) padding mask of a padded encoder, or None.

    ``dropout`` > 0 (the model's attention dropout, in train mode): the output is attention with dropout on
    its weights, as the unpatched model computes it in train mode (PyTorch's SDPA with ``dropout_p``: the
    fused kernels have no dropout, so the output is computed a second time there); the scores, the fuse
    weights and so the selection come from the attention without dropout."""
    if q.shape[0] == 0:  # an empty batch: nothing to score, shapes as for any batch
        B, H, N, _ = q.shape
        empty = q.new_empty((B, N - cfg.num_prefix), dtype=torch.float32)
        return AttentionStats(F.scaled_dot_product_attention(q, k, v, scale=scale), empty, empty)
    stats = attention_stats(
        q, k, v, stat=cfg.stat, query=cfg.query, num_prefix=cfg.num_prefix, scale=scale, valid=valid, unit=cfg.unit
    )
    if dropout > 0:
        mask = None if valid is None else valid[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
        stats = stats._replace(out=out)
    return stats


def selection_scores(cfg: BlockConfig, stats: AttentionStats, B: int, P: int) -> torch.Tensor:
    """The block's patch scores (B, P), through the score hook if one is set."""
    scores = stats.scores[:, :P]
    if cfg.score_hook is not None:
        scores = cfg.score_hook(cfg.layer, scores)
        if not isinstance(scores, torch.Tensor) or scores.shape != (B, P):
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"pruneattn: score_hook must return a ({B}, {P}) tensor for block {cfg.layer}, got {got}")
    if cfg.fused_in:
        # The old fused token (last) competes with score -inf. NaN scores rank as -inf too and ties
        # go to the lower index, so it loses to every patch, NaN ones included: always dropped, and
        # merged into the new fused token with its own attention weight.
        scores = torch.cat([scores, scores.new_full((B, 1), float("-inf"))], dim=1)
    return scores.float()


def prune_padded(
    cfg: BlockConfig, x: torch.Tensor, stats: AttentionStats, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`prune_tokens` for a padded batch: ``valid`` (B, N) marks the real tokens of ``x``.
    Returns the kept tokens and their padding mask, which also becomes the running call's."""
    state = current(cfg.plan)
    if state is not None and state.record:
        state.before_selection[cfg.layer] = x
    B, N, _ = x.shape
    p = cfg.num_prefix
    P = N - p - int(cfg.fused_in)
    real = valid[:, p : p + P]
    if not cfg.selects or B == 0:
        kept_idx = torch.arange(P, device=x.device).expand(B, P).masked_fill(~real, -1)
    else:
        # one host read per pruning block; the fused token (last, if any) is not a patch
        rate = cfg.keep_rate if cfg.tokens is None else None
        counts = kept_per_image(valid[:, : p + P], p, keep_rate=rate, k=cfg.tokens)
        fuse_weights = stats.head_mean if cfg.mode == "fuse" else None
        x, kept_idx = select_per_image(
            x, selection_scores(cfg, stats, B, P), counts, num_prefix=p, fuse_weights=fuse_weights, valid=valid
        )
        valid = valid_after(valid, kept_idx, p, fused=cfg.mode == "fuse")
    if state is not None:
        state.kept[cfg.layer] = kept_idx
        state.valid = valid
    return x, valid


def prune_tokens(cfg: BlockConfig, x: torch.Tensor, stats: AttentionStats) -> torch.Tensor:
    """Keep the prefix and the top-k patches of ``x`` (B, N, C) [+ the fused token]; the kept indices go
    into the running forward call's state."""
    state = current(cfg.plan)
    if state is not None and state.record:
        state.before_selection[cfg.layer] = x
    B, N, _ = x.shape
    P = N - cfg.num_prefix - int(cfg.fused_in)
    if not cfg.selects:
        if state is not None:
            state.kept[cfg.layer] = torch.arange(P, device=x.device).expand(B, P)
        return x
    k = block_kept(cfg, P)
    if B == 0:
        kept_idx = torch.empty((0, k), dtype=torch.int64, device=x.device)
        kept = x[:, : cfg.num_prefix + k + int(cfg.mode == "fuse")]
    else:
        fuse_weights = stats.head_mean if cfg.mode == "fuse" else None
        # No value is read back (no sync): NaN scores follow the ranking rule on every device.
        kept, kept_idx = select_tokens(
            x, selection_scores(cfg, stats, B, P), k=k, num_prefix=cfg.num_prefix, mode=cfg.mode, fuse_weights=fuse_weights
        )
    if state is not None:
        state.kept[cfg.layer] = kept_idx
    return kept
