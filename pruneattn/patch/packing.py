"""Images packed in one sequence (Pixtral's vision encoder) <-> a padded batch with its mask."""
from __future__ import annotations

import torch


def unpack(t: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``t`` (T, ...) packed image after image -> (B, max length, ...) padded with zeros, and the
    (B, max length) mask of the real rows."""
    B, width = len(lengths), max(lengths)
    valid = torch.arange(width, device=t.device)[None, :] < torch.tensor(lengths, device=t.device)[:, None]
    out = t.new_zeros((B, width, *t.shape[1:]))
    out[valid] = t
    return out, valid


def pack(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The real rows of ``t`` (B, N, ...) under ``valid`` (B, N), image after image: (T', ...)."""
    return t[valid]
