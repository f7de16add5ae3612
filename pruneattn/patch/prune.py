"""The pruning step shared by the timm and Hugging Face blocks: scoring attention, selection, fused token.

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
- A block with keep rate 1.0 drops nothing and passes every token through unchanged (no fused token
  is created there, an existing one is carried as is), so ``keep_rate=1.0`` reproduces the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pruneattn.ops import AttentionStats, attention_stats, select_tokens
from pruneattn.validate import num_kept


@dataclass(eq=False)
class PruneConfig:
    """What one patched block does; stored on the block as ``block._pruneattn`` (not a parameter)."""

    layer: int  # index of the block in the model's block list
    keep_rate: float
    stat: str
    query: str
    mode: str
    num_prefix: int  # class / distillation / register tokens, always kept
    fused_in: bool  # the block's input ends with a fused token made by an earlier block
    orig_class: type = field(repr=False, default=object)  # restored by unpatch
    kept_idx: torch.Tensor | None = field(repr=False, default=None)  # (B, k) of the last forward
    # Set while a feature needs every patch's last value (timm forward_intermediates as a grid): the
    # block then keeps its tokens after the attention residual, before selection, in ``pre_select``.
    record: bool = field(repr=False, default=False)
    pre_select: torch.Tensor | None = field(repr=False, default=None)
    # The later pruning blocks of the same model (set on the first one only): their ``kept_idx`` is
    # cleared when this block selects, so that a forward that stops partway never leaves indices of
    # two different forwards behind (no counter, nothing for torch.compile to guard on).
    later: tuple[PruneConfig, ...] = field(repr=False, default=())


def make_configs(
    layers: list[int], keep_rates: list[float], *, stat: str, query: str, mode: str, num_prefix: int
) -> list[PruneConfig]:
    """One config per pruning block, in block order; decides statically where a fused token exists."""
    configs, fused = [], False
    for layer, rate in sorted(zip(layers, keep_rates)):
        configs.append(PruneConfig(layer, rate, stat, query, mode, num_prefix, fused_in=fused))
        fused = fused or (mode == "fuse" and rate < 1)
    configs[0].later = tuple(configs[1:])
    return configs


def attention(cfg: PruneConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> AttentionStats:
    """Attention output (B, H, N, d) and the scores of every token after the prefix (fused one included)."""
    return attention_stats(q, k, v, stat=cfg.stat, query=cfg.query, num_prefix=cfg.num_prefix, scale=scale)


def _recomputing() -> bool:
    """True while the autograd engine runs this block again (activation checkpointing's recompute).

    A recompute goes through the blocks last to first and selects exactly what the forward selected,
    so it must not mark the later blocks' indices as stale.
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def prune_tokens(cfg: PruneConfig, x: torch.Tensor, stats: AttentionStats) -> torch.Tensor:
    """Keep the prefix and the top-k patches of ``x`` (B, N, C) [+ the fused token]; record ``kept_idx``."""
    if not _recomputing():  # a new forward: the later blocks' indices are the previous forward's
        for later in cfg.later:
            later.kept_idx = None
    if cfg.record:
        cfg.pre_select = x
    B, N, _ = x.shape
    P = N - cfg.num_prefix - int(cfg.fused_in)
    if cfg.keep_rate == 1.0:
        cfg.kept_idx = torch.arange(P, device=x.device).expand(B, P)
        return x
    k = num_kept(P, keep_rate=cfg.keep_rate)
    scores = stats.scores
    if cfg.fused_in:
        # The old fused token (last) competes with score -inf. NaN scores rank as -inf too and ties
        # go to the lower index, so it loses to every patch, NaN ones included: always dropped, and
        # merged into the new fused token with its own attention weight.
        floor = scores.new_full((B, 1), float("-inf"))
        scores = torch.cat([scores[:, :P], floor], dim=1)
    fuse_weights = stats.head_mean if cfg.mode == "fuse" else None
    # No value is read back (no sync): NaN scores follow the ranking rule on every device.
    kept, cfg.kept_idx = select_tokens(
        x, scores, k=k, num_prefix=cfg.num_prefix, mode=cfg.mode, fuse_weights=fuse_weights
    )
    return kept


def compose_indices(configs: list[PruneConfig]) -> dict[int, torch.Tensor]:
    """Kept indices of each pruning block mapped to the original patch grid (device ops, no sync)."""
    out: dict[int, torch.Tensor] = {}
    prev = None
    for cfg in sorted(configs, key=lambda c: c.layer):
        if cfg.kept_idx is None:
            if prev is None:
                raise RuntimeError("kept_indices: run a forward pass of the patched model first")
            raise RuntimeError(
                f"kept_indices: the last forward pass did not finish (it raised or stopped before "
                f"pruning block {cfg.layer}), so there are no indices of one whole forward; run a "
                "complete forward pass first"
            )
        idx = cfg.kept_idx if prev is None else prev.gather(1, cfg.kept_idx)
        out[cfg.layer] = prev = idx
    return out
