"""Spatial units: a connector that joins each m x m window of a tower's patch grid into one language-model
token (InternVL's and Idefics3 / SmolVLM's pixel shuffle, Gemma 3's average pool, Mistral 3's patch
merger). Such a unit is scored and kept whole, so that the connector reads complete windows.

The windows are spatial, not runs of consecutive tokens, so the first pruning block puts each image's
patches in *unit-major order* (:func:`unit_major`) before it runs: the units in raster order of the unit
grid, each unit's m x m patches in raster order within it. Attention does not depend on the order of its
tokens; a rotary table (Pixtral's) and a padding mask are taken in the same order, so the block computes
what the unpatched block computes, only with its tokens reordered. Each unit is then a run of m * m
tokens, which the scoring attention scores as one (``unit=``: the statistic over heads of the unit's
summed received attention), and whole runs are kept: k = ceil(rate * units) per image (``tokens=k``: k
units), in raster order of the unit grid. The block's output, and every later block's, holds the kept
units one after the other, each unit's patches in raster order within it: the connector joins each run
of m * m tokens in the channel order it expects (:mod:`pruneattn.patch.vlm.connectors`).

``kept_indices`` gives each image's kept patches (m * m per kept unit) as indices into its raster patch
grid, ascending. The per-image grids come from the call (a packed tower's image sizes), else the grid is
the square of the block's patch count.
"""
from __future__ import annotations

import math

import torch

from pruneattn.ops import select_per_image, select_tokens
from pruneattn.patch.blocks import PrunedSequential
from pruneattn.patch.hf import PrunedLayer, TakesCallMask
from pruneattn.patch.masks import mask_like, padding_of
from pruneattn.patch.prune import block_kept, selection_scores
from pruneattn.patch.state import BlockConfig, current
from pruneattn.validate import kept_per_image


def unit_major(h: int, w: int, m: int, device: torch.device | None = None) -> torch.Tensor:
    """(h * w,) int64: the raster index of each patch of an h x w grid in unit-major order (units of
    m x m patches in raster order of the unit grid, each unit's patches in raster order within it)."""
    if h % m or w % m:
        raise ValueError(
            f"pruneattn: a {h} x {w} patch grid does not split into whole {m} x {m} units, which this model's "
            "connector joins; pass the processor's images"
        )
    rows = torch.arange(h, device=device).view(h // m, m, 1, 1)
    cols = torch.arange(w, device=device).view(1, 1, w // m, m)
    return (rows * w + cols).permute(0, 2, 1, 3).reshape(-1)


def side_of(unit: int) -> int:
    """m of a unit of m x m patches."""
    return math.isqrt(unit)


def image_orders(cfg: BlockConfig, x: torch.Tensor) -> torch.Tensor | None:
    """(B, P) int64: for each image of the block's input ``x`` (B, N, C), the input position (among its
    patches) of each patch in unit-major order; None where the input is in that order already (every
    pruning block after the first)."""
    if cfg.layer != cfg.plan.layers[0]:
        return None
    B, N, _ = x.shape
    P, m = N - cfg.num_prefix, side_of(cfg.unit)
    state = current(cfg.plan)
    grids = None if state is None else state.grids
    if grids is None:  # one square grid for every image
        side = math.isqrt(P)
        if side * side != P:
            raise ValueError(
                f"pruneattn: this block's {P} patches are not a square grid, which this model's connector joins "
                f"in {m} x {m} units; pass the processor's images"
            )
        return unit_major(side, side, m, x.device).expand(B, P)
    orders = []
    for h, w in grids:  # images padded to the longest: each image's padding stays where it is
        order = unit_major(h, w, m, x.device)
        orders.append(torch.cat([order, torch.arange(h * w, P, device=x.device)]))
    return torch.stack(orders)


def _take(t: torch.Tensor, order: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` (B, ...) with its last ``order.shape[1]`` entries along ``dim`` taken per image in ``order``
    (B, P)."""
    dim = dim % t.dim()
    lead = t.shape[dim] - order.shape[1]
    index = torch.cat([torch.arange(lead, device=order.device).expand(order.shape[0], lead), order + lead], 1)
    shape = [1] * t.dim()
    shape[0], shape[dim] = index.shape
    return t.gather(dim, index.view(shape).expand(*t.shape[:dim], index.shape[1], *t.shape[dim + 1 :]))


def _take_table(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """A rotary table (P, d), or per image (B, ..., P, d), its rows taken per image in ``order``."""
    return _take(t.expand(order.shape[0], *t.shape) if t.dim() == 2 else t, order, -2)


def _patch_rows(units: torch.Tensor, unit: int) -> torch.Tensor:
    """(B, k * unit): the patches (positions among the block's patches) of the kept ``units`` (B, k);
    a padding slot (-1) gives -1s."""
    rows = (units.clamp(min=0)[:, :, None] * unit + torch.arange(unit, device=units.device)).flatten(1)
    return rows.masked_fill(units.repeat_interleave(unit, 1) < 0, -1)


def prune_units(cfg: BlockConfig, x: torch.Tensor, stats, valid: torch.Tensor | None) -> torch.Tensor:
    """Keep the prefix and the k best whole units of ``x`` (B, N, C), whose patches are in unit-major
    order (runs of ``cfg.unit``); ``valid`` (B, N) marks the real tokens of a padded batch, or None. The
    kept patches (positions among the block's patches) go into the call's state."""
    state = current(cfg.plan)
    B, N, C = x.shape
    p, g = cfg.num_prefix, cfg.unit
    U = (N - p) // g
    real = None if valid is None else valid[:, p::g]
    if not cfg.selects:
        kept = torch.arange(U, device=x.device).expand(B, U)
        kept = kept if real is None else kept.masked_fill(~real, -1)
    else:
        units = x[:, p:].reshape(B, U, g * C)
        scores = selection_scores(cfg, stats, B, U)
        if real is None:
            units, kept = select_tokens(units, scores, k=block_kept(cfg, U), num_prefix=0)
        else:  # one host read per pruning block: each image's kept count
            counts = kept_per_image(real, 0, keep_rate=cfg.keep_rate if cfg.tokens is None else None, k=cfg.tokens)
            units, kept = select_per_image(units, scores, counts, num_prefix=0, fuse_weights=None, valid=real)
            valid = torch.cat([valid[:, :p], (kept >= 0).repeat_interleave(g, 1)], dim=1)
        x = torch.cat([x[:, :p], units.reshape(B, -1, C)], dim=1)
    if state is not None:
        state.kept[cfg.layer] = _patch_rows(kept, g)
        if valid is not None:
            state.valid = valid
    return x


class PrunedUnits(PrunedSequential):
    """A pruning block whose model's connector joins m x m windows (see the module docstring)."""

    keeps_name = False

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        # Reordered here, before transformers' activation checkpointing wraps the forward, so that a
        # recompute (which runs outside the call's scope) gets the same reordered inputs.
        cfg: BlockConfig = self._pruneattn
        order = image_orders(cfg, x)
        if order is None:
            return super().__call__(x, *args, **kwargs)
        x = _take(x, order, 1)
        for name in ("position_embeddings", "rope"):
            table = kwargs.get(name)
            if table is not None:  # cos and sin (or one table), the patches' rows last
                kwargs[name] = tuple(_take_table(t, order) for t in table) if isinstance(table, tuple) else _take_table(table, order)
        if cfg.padded or self.takes_padding:
            args, kwargs = _reordered_mask(args, kwargs, order)
        out = super().__call__(x, *args, **kwargs)
        state = current(cfg.plan)
        if state is not None and cfg.layer in state.kept:  # positions in the reordered input -> in the input
            kept = state.kept[cfg.layer]
            state.kept[cfg.layer] = order.gather(1, kept.clamp(min=0)).masked_fill(kept < 0, -1)
            state.sort_kept = True
        return out

    def _pruneattn_select(self, cfg: BlockConfig, x: torch.Tensor, stats, valid: torch.Tensor | None) -> torch.Tensor:
        return prune_units(cfg, x, stats, valid)


def _reordered_mask(args: tuple, kwargs: dict, order: torch.Tensor) -> tuple[tuple, dict]:
    """A padded block's arguments with its padding mask (a broadcast key mask, see
    :func:`pruneattn.patch.blocks.padding_of`) taken in ``order``."""
    valid = padding_of(args, kwargs, order.shape[0])
    if valid is None:
        return args, kwargs
    given = args[0] if args else kwargs.get("attention_mask", kwargs.get("attn_mask"))
    mask = mask_like(_take(valid, order, 1), given, given.dtype)
    if args:
        return (mask, *args[1:]), kwargs
    return args, {**kwargs, ("attention_mask" if "attention_mask" in kwargs else "attn_mask"): mask}


class PrunedUnitsPadded(TakesCallMask, PrunedUnits):
    """:class:`PrunedUnits` in a Hugging Face encoder (its layers take the call's padding mask)."""

    keeps_name = False
    takes_padding = True


def pruned_block(cls: type) -> type:
    """The mixin of a pruning block that keeps whole spatial units, for the adapter's mixin ``cls``."""
    if cls is PrunedSequential:
        return PrunedUnits
    if cls is PrunedLayer:
        return PrunedUnitsPadded
    raise TypeError(f"pruneattn.patch: this block ({cls.__name__}) cannot keep whole units of patches")
