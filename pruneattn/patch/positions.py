"""Where each token of a pruned sequence sits in the original patch grid, and what follows from it.

After a pruning block the patch tokens are a per-image subset of the grid. ``pos`` (B, P') holds,
for each remaining patch token, its index in the ORIGINAL grid (row-major, 0 = first patch);
``None`` stands for "all patches, in order" (nothing pruned yet). Three things follow from it:

- :func:`rotary_table`: a rotary position table (timm ``Eva``: EVA02, RoPE ViTs, DINOv3) gathered per
  image, so that every later block rotates each token by its original position. A fused token, if
  present, gets the identity rotation (sin 0, cos 1): it has no position, like the prefix tokens.
- :func:`gather_rows`: the same for Hugging Face's separate ``cos`` / ``sin`` tables (DINOv3).
- :func:`paint`: a (B, P, C) grid that keeps, for every patch, its last computed representation, for
  features that ask for a full grid (timm ``forward_intermediates`` with ``output_fmt="NCHW"``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pruneattn.patch.state import ForwardState


def compose(pos: torch.Tensor | None, kept_idx: torch.Tensor) -> torch.Tensor:
    """Grid positions of the patches kept by a block whose ``kept_idx`` (B, k) indexes ``pos``; -1
    (a padding slot, padded encoders) stays -1."""
    if pos is None:
        return kept_idx
    return pos.gather(1, kept_idx.clamp(min=0)).masked_fill(kept_idx < 0, -1)


def ascending(pos: torch.Tensor) -> torch.Tensor:
    """Each row of ``pos`` (B, k) sorted ascending, its padding slots (-1) last."""
    top = torch.iinfo(pos.dtype).max
    srt = torch.where(pos < 0, top, pos).sort(dim=1).values
    return srt.masked_fill(srt == top, -1)


def rotary_table(table: torch.Tensor, pos: torch.Tensor | None, fused: bool) -> torch.Tensor:
    """The rotary table for the current tokens: ``table`` as built for the full grid, either (P, D),
    (heads, P, D) or already per image (B, 1 or heads, P, D), gathered at ``pos`` into
    (B, 1 or heads, P', D), plus one identity row when the sequence ends with a fused token.

    The last dim holds sin then cos halves (timm's ``apply_rot_embed_cat`` layout)."""
    if pos is None:
        return table
    B, Pk = pos.shape
    if table.dim() == 2:
        table = table[None, None]
    elif table.dim() == 3:
        table = table[None]
    table = table.expand(B, -1, -1, -1)
    X, D = table.shape[1], table.shape[-1]
    pos = pos.clamp(min=0)  # a padding slot (-1, padded encoders) takes any row: it is never attended to
    out = table.gather(2, pos[:, None, :, None].expand(B, X, Pk, D))
    if fused:
        identity = torch.cat([out.new_zeros(D // 2), out.new_ones(D - D // 2)])
        out = torch.cat([out, identity.expand(B, X, 1, D)], dim=2)
    return out


def gather_rows(table: torch.Tensor, pos: torch.Tensor | None, fused: float | None) -> torch.Tensor:
    """One per-patch table (P, D) (Hugging Face rotary ``cos`` or ``sin``) for the current tokens:
    gathered per image at ``pos`` into (B, 1, P', D), plus one row of ``fused`` (1 for cos, 0 for sin:
    the identity rotation) when the sequence ends with a fused token (None: it does not)."""
    if pos is None:
        return table
    B, Pk = pos.shape
    out = table.expand(B, *table.shape[-2:]).gather(1, pos[:, :, None].expand(B, Pk, table.shape[-1]))
    if fused is not None:
        out = torch.cat([out, out.new_full((B, 1, table.shape[-1]), fused)], dim=1)
    return out.unsqueeze(1)


def paint(grid: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    """``grid`` (B, P, C) with the rows at ``pos`` replaced by ``tokens`` (B, P', C) (out of place)."""
    if pos is None:
        return tokens
    return grid.scatter(1, pos.unsqueeze(-1).expand(-1, -1, grid.shape[-1]), tokens.to(grid.dtype))


def composed_kept(state: "ForwardState") -> dict[int, torch.Tensor]:
    """``{block index: (B, k) int64}`` of one finished call's ``state``: the patches each pruning block
    kept, as indices into the original grid (ascending where the blocks saw another order)."""
    out: dict[int, torch.Tensor] = {}
    prev = state.origin
    for layer in sorted(state.kept):
        out[layer] = prev = compose(prev, state.kept[layer])
    if state.sort_kept:
        out = {layer: ascending(idx) for layer, idx in out.items()}
    return out
