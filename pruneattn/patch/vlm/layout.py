"""The caller's prompt and the model's: where each token of one sits in the other.

A full prompt (the processor's count of placeholders per image) is shortened for the model: in each
image, the placeholders of the dropped units go (:func:`shorten`: the first ``kept`` of each image stay;
:func:`shorten_to`: the kept units' own placeholders stay); every other token stays, in order. Several
prompts are then padded again as the processor would have padded them: the caller's padding goes, and
each row is padded up to the longest shortened row, on the side the caller's attention mask pads (left
where it pads no row, as generation needs). A single prompt keeps whatever padding it has. Every tensor
that runs along the prompt (ids, embeddings, attention mask, labels, token types, positions) is taken
through the same :class:`Shortening`. A :class:`CallerView` keeps that map with the model's cache, so
that a continuation written against the caller's longer sequence is mapped onto the model's exactly.

A planned prompt (the kept count of placeholders per image, :mod:`pruneattn.patch.vlm.processor`) is
the model's prompt as it is; for positions that the model derives from the full image (M-RoPE), it is
laid out again at full length (:func:`expand`), with the dropped units' placeholders back in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Tensors that run along the prompt (batch, tokens, ...), and what an added padding slot holds.
ALONG = {"input_ids": None, "inputs_embeds": 0, "attention_mask": 0, "token_type_ids": 0, "mm_token_type_ids": 0,
         "labels": -100}


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

    def rows(self, repeats: int) -> Shortening:
        """The same map with each row repeated ``repeats`` times (beams, returned sequences)."""
        if repeats == 1:
            return self
        return Shortening(*(t.repeat_interleave(repeats, 0) for t in (self.source, self.real, self.removed_before)),
                          self.padded)

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
    return shorten_images(is_image, [full] * num_images, [kept] * num_images, attention_mask)


def shorten_images(
    is_image: torch.Tensor,
    full: list[int],
    kept: list[int],
    attention_mask: torch.Tensor | None,
    rows: list[int] | None = None,
) -> Shortening:
    """The shortening of prompts whose image placeholders are ``is_image`` (B, L) bool, image i (in batch
    order) taking ``full[i]`` of which the first ``kept[i]`` stay (see :func:`shorten_to`).

    ``rows``: each image's placeholders come in rows of ``rows[i]``, each row followed by one layout token
    (Mistral 3's ``[IMG_BREAK]``, its last row's ``[IMG_END]``): the tokens after the rows that no kept
    placeholder reaches go too (not the image's last), so the kept ones are laid out as the processor lays
    out ``kept[i]`` placeholders: rows of the same width, the last one shorter."""
    device = is_image.device
    counts, stay = torch.tensor(full, device=device), torch.tensor(kept, device=device)
    ends = counts.cumsum(0)
    # A placeholder's rank among all placeholders (batch order); a token after it has the same rank.
    rank = (is_image.flatten().long().cumsum(0) - 1).view_as(is_image).clamp(min=0)
    image = torch.bucketize(rank, ends, right=True).clamp(max=len(full) - 1)
    within = rank - (ends - counts)[image]  # the (last) placeholder's place among its image's
    stays = ~is_image | (within < stay[image])
    removed = sum(full) - sum(kept)
    if rows is not None:
        width = torch.tensor(rows, device=device)[image]
        after = torch.nn.functional.pad(is_image[:, :-1], (1, 0)) & ~is_image  # the token after a placeholder
        reached = within + 1
        breaks = after & (reached % width == 0) & (reached < counts[image])
        stays &= ~breaks | (reached < stay[image])
        removed += sum(f // w - -(-k // w) for f, k, w in zip(full, kept, rows))
    return shorten_to(stays, attention_mask, is_image, sum(full), removed)


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


@dataclass(frozen=True)
class CallerView:
    """A caller's full prompt and the model's shortened one: kept with the model's cache, so that a later
    call written against the caller's sequence (the full prompt, then the tokens generated after it, then
    more) is mapped onto the model's, whose cache holds the shortened prompt, then the same tokens."""

    cut: Shortening

    @property
    def caller_length(self) -> int:
        return self.cut.removed_before.shape[1]

    def _rows(self, batch: int) -> Shortening:
        rows = self.cut.source.shape[0]
        if batch % rows:
            raise ValueError(
                f"pruneattn: this call has {batch} rows, the prompt its cache holds had {rows}; continue the cache "
                "with the rows it was made with"
            )
        return self.cut.rows(batch // rows)

    def to_model(self, t: torch.Tensor, fill: float | int) -> torch.Tensor:
        """``t`` (B, L + n, ...), written against the caller's sequence, along the model's (B, L' + n, ...)."""
        L = self.caller_length
        if t.shape[1] < L:
            raise ValueError(
                f"pruneattn: this call's sequence ({t.shape[1]} tokens) is shorter than the prompt its cache "
                f"holds ({L} tokens as the caller wrote it); pass the whole conversation so far"
            )
        return torch.cat([self._rows(t.shape[0]).take(t[:, :L], fill), t[:, L:]], dim=1)


def expand(
    is_image: torch.Tensor, kept: torch.Tensor, units: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay a planned prompt out at full length: ``is_image`` (B, L) marks its placeholders, each image's
    ``kept`` units (images, k) (ascending unit indices, -1 padded; images in batch order) stand for its
    ``units`` (images,). Returns, for each token of the planned prompt, its position in the full-length
    layout (B, L), whether each full-length position is a dropped unit's placeholder (B, W), and whether it
    holds a token at all (B, W): the rows' full lengths differ, so the shorter ones end in empty slots."""
    counts = (kept >= 0).sum(dim=1)
    rank = is_image.flatten().long().cumsum(0).view_as(is_image) - 1  # among all placeholders, batch order
    starts = counts.cumsum(0) - counts
    image = torch.bucketize(rank.clamp(min=0), counts.cumsum(0), right=True).clamp(max=kept.shape[0] - 1)
    within = (rank - starts[image]).clamp(min=0)  # the placeholder's place among its image's
    shift = torch.where(is_image, kept[image, within.clamp(max=kept.shape[1] - 1)] - within, 0)
    # Each image's dropped units sit before the tokens after it: add them after its last placeholder.
    last = is_image & (within == counts[image] - 1)
    dropped = torch.where(last, units[image] - counts[image], 0)
    position = torch.arange(is_image.shape[1], device=is_image.device) + dropped.cumsum(1) - dropped + shift
    lengths = is_image.shape[1] + dropped.sum(1)
    width = int(lengths.max())  # one host read: the full-length layout's width
    slots = torch.arange(width, device=is_image.device).expand(is_image.shape[0], width)
    taken = torch.zeros((is_image.shape[0], width), dtype=torch.bool, device=is_image.device)
    taken.scatter_(1, position, True)
    held = slots < lengths[:, None]
    return position, held & ~taken, held
