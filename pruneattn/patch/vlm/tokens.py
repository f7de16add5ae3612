"""How many language-model tokens an image yields, unpruned and pruned: the one count that a patched
vision-language model's prompt handling, the processor that plans its prompts and the benchmarks use.

The count depends on the image's size and the settings only, never on its content: k = ceil(rate *
units) (``tokens=k``: at most k) of the image's units (patches, or merged tokens), through the tower's
pruning blocks in order (:func:`pruneattn.patch.options.kept_after`, the count the blocks themselves
keep), plus the tokens the model adds per image (a class token it keeps, a fused token).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pruneattn.patch.options import Amount, kept_after
from pruneattn.patch.registry import VisionLanguage


@dataclass(frozen=True)
class ImageTokens:
    """Language-model tokens per image, from the image's number of units."""

    amounts: tuple[Amount, ...]  # the tower's pruning blocks, in order
    extra: int = 0  # tokens per image besides its units (a class token the model keeps)
    fused: bool = False  # a fused token per image follows the kept ones

    def full(self, units: int) -> int:
        """Placeholders an image of ``units`` units takes in the processor's own prompt."""
        return units + self.extra

    def kept(self, units: int) -> int:
        """Tokens the patched model's language model reads for an image of ``units`` units."""
        return kept_after(units, self.amounts) + int(self.fused) + self.extra

    def planned(self, full: int) -> int:
        """The kept count for an image the unpatched processor gives ``full`` placeholders."""
        return self.kept(full - self.extra)


@dataclass(frozen=True)
class VisionLanguagePlan:
    """What a patched vision-language model needs to read a call (frozen, on its base model)."""

    entry: VisionLanguage
    tokens: ImageTokens
    image_token_id: int
    pad_token_id: int
    unit: int  # patches per unit that the model joins into one token (1: each patch is a token)
    patch_size: int  # fixed-size towers: pixels per patch side
    image_size: int | None  # fixed-size towers: the image side the tower takes; None: any size (grid)
    channels: int
    feature_layer: int | tuple[int, ...] | None  # as configured (a call must not ask for another)
    select_strategy: str | None

    def units(self, call: dict, images: int) -> list[int]:
        """Units of each of the ``images`` images of ``call`` (batch order): from their patch grids or sizes
        (towers that take any size), else from the pixels' size or, for features computed beforehand, the
        tower's."""
        if self.entry.grid is not None:
            grid = call.get(self.entry.grid)
            if grid is None:
                raise ValueError(f"pruneattn: pass the processor's {self.entry.grid} with the images")
            return [int(n) // self.unit for n in torch.as_tensor(grid).prod(-1).tolist()]
        if self.entry.sizes is not None:
            return [h * w for h, w in self.unit_grids(call)]
        pixels = call.get("pixel_values")
        h, w = pixels.shape[-2:] if pixels is not None else (self.image_size, self.image_size)
        return [(int(h) // self.patch_size) * (int(w) // self.patch_size) // self.unit] * images

    def unit_grids(self, call: dict) -> list[tuple[int, int]]:
        """(rows, columns) of units of each image of a call whose images are of any size (``entry.sizes``)."""
        sizes = call.get(self.entry.sizes)
        if sizes is None:
            raise ValueError(f"pruneattn: pass the processor's {self.entry.sizes} with the images")
        step = self.patch_size * math.isqrt(self.unit)
        return [(int(h) // step, int(w) // step) for h, w in torch.as_tensor(sizes).tolist()]
