"""``pruneattn.patch_processor``: a Hugging Face processor that writes the planned prompt.

How many tokens an image keeps depends only on its size and the patch's settings
(:class:`~pruneattn.patch.vlm.tokens.ImageTokens`), so the processor can insert exactly that many
placeholders, as serving engines plan multimodal tokens before they schedule a request. The patched
model then reads the prompt as it is: the caller's sequence and the model's are the same, so whatever
reads the sequence (``generate``, streamers, stopping criteria, caches, a caller's own decoding loop,
assisted decoding, pipelines) works as for any model. Which units are kept is still decided in the tower.

The processor's class is swapped (as the model's blocks are) for one whose ``replace_image_token`` (the
text each image's placeholder becomes) and ``_get_num_multimodal_tokens`` (the counts a serving engine
asks for) give the kept count; ``pruneattn.unpatch(processor)`` restores it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from torch import nn

from pruneattn._versions import installed, release
from pruneattn.patch.swap import Swapped, original_class, swap
from pruneattn.patch.vlm.tokens import ImageTokens, VisionLanguagePlan


@dataclass(frozen=True)
class ProcessorPlan:
    """What a patched processor writes per image (frozen, on the processor)."""

    tokens: ImageTokens
    image_token: str  # the placeholder the model reads
    model: str  # the model's class, for messages
    tile: int | None  # placeholders of one tile (fixed-size towers); None: each image has its own count
    layout: str  # the registry entry's layout: "tiles" or "rows"

    def count(self, full: int, tiles: int | None = None) -> int:
        """The kept count of an image (all its tiles) that the unpatched processor gives ``full`` placeholders.

        ``tiles``: the image's tile count where the processor gives it; then ``full`` may also count tokens
        around the tiles' placeholders (image start and end tokens, tile tags: transformers releases before
        5.25 count them), which stay as they are."""
        if self.tile is None:
            return self.tokens.planned(full)
        if tiles is not None and 0 < tiles * self.tile <= full:
            return full - tiles * self.tile + tiles * self.tokens.planned(self.tile)
        if full % self.tile:
            raise ValueError(
                f"pruneattn: this processor writes {full} image tokens for an image, not a whole number of tiles of "
                f"{self.tile} for this {self.model}; the processor and the model belong to different settings"
            )
        return full // self.tile * self.tokens.planned(self.tile)

    def text(self, full_text: str) -> str:
        """The planned text of one image whose unpatched text is ``full_text``: "tiles": each run of
        placeholders (whole tiles) with its kept count, the text around the runs as it is; "rows": the
        text up to the kept count's last placeholder, then what follows the image's last placeholder."""
        token = self.image_token
        parts = re.split(f"((?:{re.escape(token)})+)", full_text)  # text, run, text, ..., run, text
        runs = [len(run) // len(token) for run in parts[1::2]]
        if self.layout == "tiles":
            return "".join(token * self.count(part.count(token)) if i % 2 else part for i, part in enumerate(parts))
        left, out = self.count(sum(runs)), [parts[0]]
        for i, n in enumerate(runs):
            out.append(token * min(n, left))
            left -= min(n, left)
            if not left:
                break
            out.append(parts[2 * i + 2])  # the layout token between this row and the next
        return "".join([*out, parts[-1]])


class PlansImageTokens(Swapped):
    """Swapped into a processor patched by :func:`patch_processor`."""

    keeps_name = True  # transformers saves the processor's class name with it

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self._pruneattn_tokens.text(super().replace_image_token(image_inputs, image_idx, **kwargs))

    def _get_num_multimodal_tokens(self, *args, **kwargs):
        data = super()._get_num_multimodal_tokens(*args, **kwargs)
        counts = getattr(data, "num_image_tokens", None)
        if counts is not None and self._pruneattn_tokens.layout == "rows" and _counts_layout_tokens():
            raise NotImplementedError(
                f"pruneattn: with transformers {installed('transformers')}, this {type(self).__name__}'s counts of "
                "image tokens include its row-break tokens, which pruneattn cannot plan from the count alone; "
                "transformers 5.25 and later count the placeholders only (pip install -U transformers). Its "
                "prompts (processor(text=..., images=...)) are planned with any release."
            )
        if counts is not None:
            tiles = getattr(data, "num_image_patches", None) or [None] * len(counts)
            data.num_image_tokens = [self._pruneattn_tokens.count(n, t) for n, t in zip(counts, tiles)]
        return data


def _counts_layout_tokens() -> bool:
    """Whether the installed transformers' processors count an image's layout tokens (start and end,
    tile tags, row breaks) with its placeholders in ``_get_num_multimodal_tokens`` (releases before 5.25)."""
    return release(installed("transformers") or "0") < (5, 25)


def model_plan(model: nn.Module) -> VisionLanguagePlan:
    """The frozen settings of a patched vision-language ``model`` (TypeError where it is not one)."""
    found = [m.__dict__["_pruneattn_vlm"] for m in model.modules() if "_pruneattn_vlm" in m.__dict__]
    if not found:
        raise TypeError(
            f"pruneattn: this {type(model).__name__} is not a vision-language model patched by pruneattn.patch; "
            "patch the model first, then its processor"
        )
    return found[0]


def _placeholder(processor: object, plan: VisionLanguagePlan) -> str:
    """The processor's placeholder of the model's image token (refused where it is another token)."""
    tokenizer = getattr(processor, "tokenizer", None)
    token = processor
    for name in plan.entry.placeholder.split("."):
        token = getattr(token, name, None)
    if token is None or tokenizer is None:
        raise TypeError(f"pruneattn.patch_processor: this {type(processor).__name__} has no image token to plan")
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id != plan.image_token_id:
        raise ValueError(
            f"pruneattn.patch_processor: the processor's image token {token!r} is id {token_id}, the model's image "
            f"token id is {plan.image_token_id}: they belong to different models"
        )
    return token


def _tile(processor: object, plan: VisionLanguagePlan, model: nn.Module) -> int | None:
    """Placeholders of one tile (fixed-size towers), after refusing a processor whose images the model's
    tower does not take as it does."""
    side = math.isqrt(plan.unit)
    if plan.entry.grid is not None or plan.entry.sizes is not None:  # images of any size: units must agree
        merge = getattr(getattr(processor, "image_processor", None), "merge_size", None)
        merge = getattr(processor, "spatial_merge_size", merge)
        patch = getattr(processor, "patch_size", None) if plan.entry.sizes is not None else None
        if (merge is not None and merge != side) or (patch is not None and patch != plan.patch_size):
            raise ValueError(
                f"pruneattn.patch_processor: the processor makes units of {merge} x {merge} patches of {patch} px, the "
                f"model's tower {side} x {side} patches of {plan.patch_size} px: they belong to different models"
            )
        return None
    tile = plan.tokens.full((plan.image_size // plan.patch_size) ** 2 // plan.unit)
    per_tile = next((v for v in (getattr(processor, a, None) for a in ("image_seq_length", "image_seq_len"))
                     if isinstance(v, int)), None)
    if plan.entry.tiles and per_tile is not None:  # a tiling processor's own count of placeholders per tile
        if per_tile != tile:
            raise ValueError(
                f"pruneattn.patch_processor: the processor writes {per_tile} image tokens per tile where this "
                f"{type(model).__name__}'s tower yields {tile} (check the processor's image_seq_length against the "
                "model's config)"
            )
        return tile
    size = [[plan.image_size, plan.image_size]]
    try:
        full = original_class(processor)._get_num_multimodal_tokens(processor, image_sizes=size)["num_image_tokens"][0]
    except (AttributeError, KeyError, TypeError):
        return tile  # the processor cannot say; the model checks every prompt it gets
    if full % tile or (full != tile and not plan.entry.tiles):
        raise ValueError(
            f"pruneattn.patch_processor: the processor writes {full} image tokens per image where this "
            f"{type(model).__name__}'s tower yields {tile} per tile (check the processor's patch_size, image_seq_length, "
            "vision_feature_select_strategy and num_additional_image_tokens against the model's config)"
        )
    return tile


def patch_processor(processor: object, model: nn.Module) -> object:
    """Make ``processor`` insert, per image, the image tokens the patched ``model``'s language model reads
    (see the module docstring), in place; raises before any change where they would not agree."""
    if not hasattr(processor, "replace_image_token"):
        raise TypeError(
            f"pruneattn.patch_processor expects a Hugging Face multimodal processor (with replace_image_token), "
            f"got {type(processor).__name__}"
        )
    plan = model_plan(model)
    token, tile = _placeholder(processor, plan), _tile(processor, plan, model)
    swap(processor, PlansImageTokens)  # a patched processor is patched again from its original class
    processor._pruneattn_tokens = ProcessorPlan(plan.tokens, token, type(model).__name__, tile, plan.entry.layout)
    return processor
