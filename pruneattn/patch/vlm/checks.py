"""A vision-language call's inputs, checked against the patch before any work: the per-call settings the
patch was not made for, pixels that do not fit the tower, videos, images in a call that continues a
cache; and where the call's image placeholders are."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from pruneattn.patch.vlm.tokens import VisionLanguagePlan


def images_of(plan: VisionLanguagePlan, call: dict, pixels: torch.Tensor) -> int:
    """How many images the call's pixels hold (raises where their shape does not fit the tower)."""
    if plan.entry.grid is not None:
        grid = call.get(plan.entry.grid)
        if grid is None:
            raise ValueError(f"pruneattn: pass the processor's {plan.entry.grid} with pixel_values")
        return len(grid)
    if plan.entry.stacked:  # (prompts, slots, ...): the images that are not all zeros, at least one
        return max(1, int((pixels != 0).flatten(2).any(dim=2).sum()))
    return pixels.shape[0]  # its shape checked with the call's settings


def videos_refused(plan: VisionLanguagePlan) -> ValueError:
    """The error for videos: the prompt handling reads image placeholders only (a video's frames are another
    kind of placeholder, written frame by frame), so a patched model takes images only."""
    return ValueError(
        f"pruneattn: a patched {plan.entry.label} prunes image tokens; videos (pixel_values_videos) are not "
        "supported. Unpatch the model (pruneattn.unpatch) for video prompts"
    )


def check_settings(plan: VisionLanguagePlan, call: dict) -> None:
    """Refuse per-call settings and inputs the patch was not made for, before any work."""
    layer = call.get("vision_feature_layer")
    if layer is not None:
        layer = tuple(layer) if isinstance(layer, Sequence) else layer
        if layer != plan.feature_layer:
            raise ValueError(
                f"pruneattn: this model was patched for vision_feature_layer={plan.feature_layer}; the call asks "
                f"for {layer}. Patch it again after setting config.vision_feature_layer"
            )
    strategy = call.get("vision_feature_select_strategy")
    if strategy is not None and strategy != plan.select_strategy:
        raise ValueError(
            f"pruneattn: this model was patched for vision_feature_select_strategy={plan.select_strategy!r}; the "
            f"call asks for {strategy!r}. Patch it again after setting config.vision_feature_select_strategy"
        )
    sizes = call.get("image_sizes")
    if plan.entry.grid is None and plan.entry.sizes != "image_sizes" and sizes is not None:
        raise ValueError("pruneattn: image_sizes (images of several sizes in one tensor) is not supported for this model")
    if call.get("pixel_values_videos") is not None:
        raise videos_refused(plan)
    pixels = call.get("pixel_values")
    dims = 5 if plan.entry.stacked else 4
    if pixels is not None and plan.entry.grid is None and (pixels.dim() != dims or pixels.shape[-3] != plan.channels):
        shape = f"{'prompts, images' if plan.entry.stacked else 'images'}, {plan.channels}, height, width"
        raise ValueError(
            f"pruneattn: pixel_values must be ({shape}) for this model's vision tower, got {tuple(pixels.shape)}; pass "
            "the processor's pixel_values"
        )
    if pixels is not None and plan.entry.sizes is not None:
        _check_sizes(plan, call, pixels)
    if pixels is not None and plan.image_size is not None and not call.get("interpolate_pos_encoding"):
        if tuple(pixels.shape[-2:]) != (plan.image_size, plan.image_size):
            raise ValueError(
                f"pruneattn: pixel_values are {pixels.shape[-2]} x {pixels.shape[-1]} pixels; this model's vision "
                f"tower takes {plan.image_size} x {plan.image_size}. Pass the processor's pixel_values"
            )
    if pixels is not None and plan.entry.grid is not None:
        grid = call.get(plan.entry.grid)
        if grid is not None and pixels.shape[0] != int(torch.as_tensor(grid).prod(-1).sum()):
            raise ValueError(
                f"pruneattn: pixel_values hold {pixels.shape[0]} patches where {plan.entry.grid} makes "
                f"{int(torch.as_tensor(grid).prod(-1).sum())}; pass the processor's outputs as they are"
            )
    mask = call.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() != 2:
        raise ValueError("pruneattn: pass the processor's 2-D attention_mask (batch, tokens), not a prepared 4-D mask")


def _check_sizes(plan: VisionLanguagePlan, call: dict, pixels: torch.Tensor) -> None:
    """Images of any size padded into one tensor: one size per image, each a whole number of units."""
    sizes = call.get(plan.entry.sizes)
    if sizes is None:
        raise ValueError(f"pruneattn: pass the processor's {plan.entry.sizes} with pixel_values")
    sizes = torch.as_tensor(sizes).tolist()
    step = plan.patch_size * math.isqrt(plan.unit)
    if len(sizes) != pixels.shape[0]:
        raise ValueError(
            f"pruneattn: {plan.entry.sizes} describes {len(sizes)} images, pixel_values hold {pixels.shape[0]}; pass "
            "the processor's outputs as they are"
        )
    for h, w in sizes:
        if h % step or w % step or h > pixels.shape[-2] or w > pixels.shape[-1]:
            raise ValueError(
                f"pruneattn: an image of {h} x {w} pixels is not a whole number of {step} x {step} pixel units within "
                f"pixel_values of {pixels.shape[-2]} x {pixels.shape[-1]}; pass the processor's outputs as they are"
            )


def placeholders(plan: VisionLanguagePlan, base: nn.Module, call: dict, past: int) -> torch.Tensor:
    """(B, L) bool: the image placeholders of the call's prompt (from its ids, else its embeddings), in the
    part the cache does not hold yet."""
    ids = call.get("input_ids")
    if ids is not None:
        is_image = ids == plan.image_token_id
    else:
        embeds = call["inputs_embeds"]
        image = base.get_input_embeddings()(torch.tensor(plan.image_token_id, device=embeds.device))
        is_image = (embeds == image.to(embeds.dtype)).all(-1)
    mask = call.get("attention_mask")
    if past and isinstance(mask, torch.Tensor) and mask.shape[1] == is_image.shape[1]:
        is_image = is_image[:, past:]
    return is_image


def refuse_new_image(plan: VisionLanguagePlan, cache: object, full_prompt: bool) -> None:
    """Images in a call that continues a cache: refused where a full prompt is involved (the cache holds a
    shortened one, or the new image comes with the full count), and for M-RoPE models."""
    if full_prompt:
        raise ValueError(
            "pruneattn: this call continues a cache with a new image written with the processor's full count of "
            "image tokens; the model cannot shorten it in place. Plan the prompts with pruneattn.patch_processor "
            "(then images in later turns work as for any model), or pass the whole conversation without a cache"
        )
    if plan.entry.positions == "mrope":
        raise ValueError(
            f"pruneattn: continuing a cache with a new image is not supported for {plan.entry.label}; pass the "
            "whole conversation without a cache"
        )
