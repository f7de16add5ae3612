"""M-RoPE positions (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, GLM-4.xV) of a pruned prompt: each kept token
keeps the (t, h, w) id it has in the full prompt, text after an image keeps its unpruned ids, and
decoding continues from each row's largest id + 1. (Interleaved M-RoPE, Qwen3-VL's, takes the same ids.)

The ids come from the model's own ``get_rope_index`` on the full-length prompt (the caller's, or a
planned prompt laid out again at full length by :func:`pruneattn.patch.vlm.layout.expand`), then are
taken at the model's tokens.
"""
from __future__ import annotations

import torch
from torch import nn


def take_rows(positions: torch.Tensor, index: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``positions`` (R, B, W) at ``index`` (B, L) of each row: (R, B, L), 1 where ``real`` is False."""
    out = positions.gather(2, index[None].expand(positions.shape[0], -1, -1))
    return out.masked_fill(~real[None], 1)


def full_positions(
    base: nn.Module, ids: torch.Tensor, types: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """(3, B, W): the (t, h, w) ids the unpatched model gives the full-length prompt ``ids``."""
    positions, _ = base.get_rope_index(ids, types, image_grid_thw=grid, attention_mask=mask)
    return positions


def with_text_row(positions: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's ``position_ids`` (4, B, L): the text row (the index among each row's real tokens, as
    ``generate`` builds it) before the (t, h, w) rows ``positions``; and ``rope_deltas`` (B, 1), which
    continue each row from its largest id + 1 when later calls pass no positions."""
    text = (real.long().cumsum(-1) - 1).clamp(min=0)
    largest = positions.masked_fill(~real[None], -1).amax(dim=(0, 2))
    deltas = (largest + 1 - real.sum(dim=1)).view(-1, 1)
    return torch.cat([text[None], positions]), deltas
