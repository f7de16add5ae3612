"""``split_qkv``: the q, k, v views of a packed qkv projection."""
from __future__ import annotations

import torch

from pruneattn.validate import check_split_inputs


def split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views q, k, v (B, H, N, d) of a packed (B, N, 3 * H * d) projection, as timm lays it out."""
    check_split_inputs(qkv, num_heads)
    B, N, width = qkv.shape
    # the head dim spelled out: -1 cannot be inferred for an empty batch
    return qkv.reshape(B, N, 3, num_heads, width // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
