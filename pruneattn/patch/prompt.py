"""Shortening a prompt whose images now yield fewer tokens: each image's run of placeholders shrinks to
the number of tokens its pruned tower output has, as if the processor had inserted that many.

The caller's prompt holds ``full`` placeholders per image (the processor's count). In each image, the
first ``kept`` placeholders stay and the rest go (:func:`shorten`), or the placeholders of the kept
merged units stay (:func:`shorten_to`, Qwen2.5-VL); every other token stays, in order. Several prompts
are then padded again as the processor would have padded them: the caller's padding goes, and each
row is padded up to the longest shortened row, on the side the caller's attention mask pads (left
where it pads no row, as generation needs). A single prompt keeps whatever padding it has.
Every tensor that runs along the prompt (ids, embeddings, attention mask, labels, token types,
positions) is taken through the same :class:`Shortening`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shortening:
    """Where each position of the shortened prompt comes from."""

    source: torch.Tensor  # (B, L') int64: the caller's position (0 where padding was added)
    real: torch.Tensor  # (B, L') bool: False where padding was added
    removed_before: torch.Tensor  # (B, L) int64: placeholders removed before each caller position
    padded: bool  # rows differ in length, so padding was added

    @property
    def length(self) -> int:
        return self.source.shape[1]

    def take(self, t: torch.Tensor, fill: float | int) -> torch.Tensor:
        """``t`` (B, L, ...) along the shortened prompt, ``fill`` where padding was added."""
        index = self.source.view(*self.source.shape, *(1,) * (t.dim() - 2)).expand(-1, -1, *t.shape[2:])
        out = t.gather(1, index)
        real = self.real.view(*self.real.shape, *(1,) * (t.dim() - 2))
        return out.masked_fill(~real, fill)

    def positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """1-D position ids (B or 1, L) of the caller's prompt, made contiguous over the shortened one: each
        kept token moves back by the placeholders removed before it (added padding gets 1)."""
        pos = position_ids.expand(self.removed_before.shape[0], -1)
        return self.take(pos - self.removed_before, 1)


def shorten(
    is_image: torch.Tensor,
    full: int,
    kept: int,
    num_images: int,
    attention_mask: torch.Tensor | None,
) -> Shortening:
    """The shortening of prompts whose image placeholders are ``is_image`` (B, L) bool, ``full`` per image
    of which the first ``kept`` stay, for ``num_images`` images in all (see :func:`shorten_to`)."""
    rank = is_image.long().cumsum(1) - 1  # index of each placeholder among its row's placeholders
    stays = ~is_image | (rank % full < kept)
    return shorten_to(stays, attention_mask, is_image, num_images * full, num_images * (full - kept))


def shorten_to(
    stays: torch.Tensor,
    attention_mask: torch.Tensor | None,
    is_image: torch.Tensor,
    placeholders: int,
    removed_total: int,
) -> Shortening:
    """The shortening of prompts in which the caller positions ``stays`` (B, L) bool stay (every token but
    the removed placeholders), the prompts holding ``is_image`` (B, L) placeholders, ``placeholders`` in
    all, of which ``removed_total`` go.

    A single prompt is shortened without reading anything back from the device. For several prompts
    the row lengths (and the padding side) are read back once, since the shortened length depends on
    how many images each prompt holds; a placeholder count other than ``placeholders`` then raises
    ValueError.
    """
    B, L = stays.shape
    keep, left = stays, True
    if B == 1:
        count = keep.sum(1)
        length, padded = L - removed_total, False
    else:
        pads_left = pads_right = torch.zeros((), dtype=torch.bool, device=stays.device)
        if attention_mask is not None:
            keep = keep & (attention_mask != 0)  # the caller's padding goes; the rows are padded again
            pads_left, pads_right = (attention_mask[:, 0] == 0).any(), (attention_mask[:, -1] == 0).any()
        count = keep.sum(1)
        stats = torch.stack([count.max(), count.min(), is_image.sum(), pads_left.long(), pads_right.long()])
        longest, shortest, found, pads_left, pads_right = stats.tolist()  # the one read-back
        if found != placeholders:
            raise ValueError(
                f"pruneattn: the prompts hold {found} image placeholder tokens where their images make "
                f"{placeholders}; pass the processor's input_ids as they are"
            )
        length, padded = longest, longest != shortest
        left = bool(pads_left) or not pads_right
    dest = keep.long().cumsum(1) - 1
    if left:
        dest = dest + (length - count).unsqueeze(1)
    dest = torch.where(keep, dest, length)  # removed tokens land in a spare column, cut below
    positions = torch.arange(L, device=stays.device).expand(B, L)
    source = torch.zeros((B, length + 1), dtype=torch.long, device=stays.device).scatter_(1, dest, positions)
    real = torch.zeros((B, length + 1), dtype=torch.bool, device=stays.device).scatter_(1, dest, keep)
    removed = (~stays).long()  # positions move back by the placeholders removed (not the padding)
    return Shortening(source[:, :length], real[:, :length], removed.cumsum(1) - removed, padded)
