"""One call of a patched vision-language model, read before the model runs: the one path every family
(1-D positions: LLaVA, PaliGemma; M-RoPE: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, GLM-4.xV) goes
through.

A call holds its images (``pixel_values``, or features computed beforehand in ``mm_encoder_outputs``)
and a prompt with placeholders for them. The number of placeholders says which prompt it is:

- the **planned** prompt (k per image, as a processor patched by ``pruneattn.patch_processor`` writes
  it): the model's own sequence. Models with 1-D positions need nothing; M-RoPE models get each kept
  token's (t, h, w) id from its image's kept units (the tower runs first).
- the **full** prompt (the unpatched processor's count): the model shortens it, removing the dropped
  units' placeholders from every tensor that runs along it (:mod:`pruneattn.patch.vlm.layout`). The
  map from the caller's sequence to the model's (:class:`~pruneattn.patch.vlm.layout.CallerView`) is
  kept with the model's cache, so that a continuation written against the caller's sequence (its
  full-length ids and mask) is mapped exactly.
- any other count is refused before any work, as the unpatched model refuses it.

:func:`prepare` returns the model's call, or None where the call is the model's already.
"""
from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pruneattn.patch.vlm.layout import CallerView, Shortening, expand, shorten_images, shorten_to
from pruneattn.patch.vlm.positions import full_positions, take_rows, with_text_row
from pruneattn.patch.vlm.tokens import VisionLanguagePlan

# Tensors that run along the prompt (batch, tokens, ...), and what an added padding slot holds.
ALONG = {"input_ids": None, "inputs_embeds": 0, "attention_mask": 0, "token_type_ids": 0, "mm_token_type_ids": 0,
         "labels": -100}
CACHES = ("cache", "past_key_values")


@dataclass(frozen=True)
class Prepared:
    """The model's call, and how the caller's longer prompt maps onto it (None: the same sequence)."""

    call: dict
    view: CallerView | None


def arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name (positional ones bound to the forward's parameters)."""
    if not args:
        return dict(kwargs)
    signature = inspect.signature(type(module).forward)
    bound = signature.bind_partial(module, *args, **kwargs).arguments
    bound.pop("self", None)
    extra = next((n for n, p in signature.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    if extra is not None:
        bound.update(bound.pop(extra, {}))
    return bound


def cache_of(call: dict) -> object | None:
    return next((call[n] for n in CACHES if call.get(n) is not None), None)


def cached_length(cache: object | None) -> int:
    return 0 if cache is None or not hasattr(cache, "get_seq_length") else int(cache.get_seq_length())


# ----------------------------------------------------------------------------- caches and their views

_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def remember(cache: object | None, view: CallerView) -> None:
    """Keep ``view`` with ``cache`` (the model's cache of a shortened prompt) for later calls."""
    if cache is not None:
        try:
            _VIEWS[cache] = view
        except TypeError:  # a cache that takes no weak reference: continuations in the caller's terms refuse
            pass


def view_of(cache: object | None) -> CallerView | None:
    try:
        return None if cache is None else _VIEWS.get(cache)
    except TypeError:
        return None


# ----------------------------------------------------------------------------- the call


def image_features(call: dict) -> object | None:
    encoded = call.get("mm_encoder_outputs")
    return encoded.get("image") if isinstance(encoded, dict) else None


def feature_rows(features: object) -> tuple[int, int]:
    """(images, language-model tokens in all) of features computed beforehand."""
    pooled = features.pooler_output if hasattr(features, "pooler_output") else features
    if isinstance(pooled, torch.Tensor):  # (images, tokens, C)
        return pooled.shape[0], pooled.shape[0] * pooled.shape[1]
    return len(pooled), sum(int(p.shape[0]) for p in pooled)


def prepare(plan: VisionLanguagePlan, base: nn.Module, call: dict) -> Prepared | None:
    """The model's call for ``call`` (see the module docstring), or None where it needs no change."""
    pixels, features = call.get("pixel_values"), image_features(call)
    if pixels is None and features is None:
        return _continuation(plan, call)
    if call.get("input_ids") is None and call.get("inputs_embeds") is None:
        return None  # the model says what it needs
    _check_settings(plan, call)
    images, given = feature_rows(features) if features is not None else (_images(plan, call, pixels), None)
    cache = cache_of(call)
    past = cached_length(cache)
    if past and view_of(cache) is not None:
        _refuse_new_image(plan, cache, True)
    is_image = _placeholders(plan, base, call, past)
    # One host read: how many placeholders (which prompt this is), and for fixed-size images whether a row
    # holds a part of an image (the prompt's rows are shortened image by image).
    per_row = is_image.sum(1)
    each = plan.tokens.full(plan.units(call, 1)[0]) if plan.image_size is not None else 1
    found, ragged = torch.stack([per_row.sum(), (per_row % each).ne(0).any()]).tolist()
    positioned = plan.entry.positions != "mrope" or call.get("position_ids") is not None
    if given is not None and found == given and positioned:
        return None  # features that fit the prompt as it is, and the positions are known
    units = plan.units(call, images)
    if len(units) != images:
        raise ValueError(
            f"pruneattn: {plan.entry.grid} describes {len(units)} images, the call holds {images}; pass the "
            "processor's outputs as they are"
        )
    full, kept = sum(plan.tokens.full(u) for u in units), sum(plan.tokens.kept(u) for u in units)
    if given is not None and found == given:  # an M-RoPE prompt whose positions follow its images' kept units
        return None if full == kept else _planned_positions(plan, base, call, features, is_image, units)
    if found not in (full, kept) or (given is not None and (found, given) != (full, kept)):
        raise ValueError(
            f"Image features and image tokens do not match: the prompts hold {found} image tokens; "
            f"{'their' if images != 1 else 'its'} {images} image{'s' if images != 1 else ''} take{'' if images != 1 else 's'} "
            f"{full} (the processor's own prompt) or {kept} (the count pruneattn keeps, which a processor patched "
            "with pruneattn.patch_processor inserts). Pass the processor's outputs as they are"
        )
    if full == kept:
        return None  # nothing pruned: the prompt is the model's as it is
    if past:
        _refuse_new_image(plan, cache, found == full)
        return None  # a planned image in a continuation: as for any model
    if found == kept:
        if plan.entry.positions != "mrope":
            return None
        features = _run_tower(base, call) if features is None else features
        return _planned_positions(plan, base, call, features, is_image, units)
    if call.get("inputs_embeds") is not None and plan.entry.positions == "mrope":
        raise ValueError("pruneattn: pass the processor's input_ids with the images (not inputs_embeds)")
    if ragged:
        raise ValueError(
            f"Image features and image tokens do not match: a prompt of this batch holds a number of image tokens "
            f"that is not a whole number of images ({each} each); pass the processor's outputs as they are"
        )
    return _shortened(plan, base, call, features, is_image, units, full - kept)


def _images(plan: VisionLanguagePlan, call: dict, pixels: torch.Tensor) -> int:
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


def _check_settings(plan: VisionLanguagePlan, call: dict) -> None:
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


def _placeholders(plan: VisionLanguagePlan, base: nn.Module, call: dict, past: int) -> torch.Tensor:
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


def _refuse_new_image(plan: VisionLanguagePlan, cache: object, full_prompt: bool) -> None:
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


def _run_tower(base: nn.Module, call: dict) -> object:
    """The images' features from the patched model's own ``get_image_features`` (its arguments taken from
    the call, as ``generate`` takes them)."""
    encode = base.get_image_features
    names = inspect.signature(encode).parameters
    kwargs = {k: call[k] for k in names if k not in ("kwargs", "self") and call.get(k) is not None}
    kwargs.update({k: call[k] for k in ("output_hidden_states", "output_attentions") if call.get(k) is not None})
    return encode(**kwargs, return_dict=True)


def _kept_units(features: object) -> torch.Tensor:
    kept = features.get("kept_units") if hasattr(features, "get") else None
    if kept is None:
        raise ValueError(
            "pruneattn: these image features do not say which units their images kept; pass pixel_values, or "
            "features from the patched model's get_image_features"
        )
    return kept


def _with_features(call: dict, features: object) -> dict:
    out = {k: v for k, v in call.items() if k != "pixel_values"}
    out["mm_encoder_outputs"] = {**(call.get("mm_encoder_outputs") or {}), "image": features}
    return out


def _planned_positions(
    plan: VisionLanguagePlan, base: nn.Module, call: dict, features: object, is_image: torch.Tensor, units: list[int]
) -> Prepared:
    """A planned prompt of an M-RoPE model: its (t, h, w) ids from its images' kept units."""
    ids, mask = call["input_ids"], call.get("attention_mask")
    kept = _kept_units(features)
    position, dropped, held = expand(is_image, kept, torch.tensor(units, device=ids.device))
    width = held.shape[1]
    full_ids = torch.full((ids.shape[0], width), plan.pad_token_id, dtype=ids.dtype, device=ids.device)
    full_ids.scatter_(1, position, ids).masked_fill_(dropped, plan.image_token_id)
    real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    full_mask = torch.zeros_like(full_ids).scatter_(1, position, real.long()) | dropped.long()
    types = call.get("mm_token_type_ids")
    types = is_image.int() if types is None else types
    full_types = torch.zeros_like(full_ids, dtype=types.dtype).scatter_(1, position, types).masked_fill_(dropped, 1)
    positions = full_positions(base, full_ids, full_types, call[plan.entry.grid], full_mask)
    position_ids, deltas = with_text_row(take_rows(positions, position, real), real)
    base.rope_deltas = deltas
    out = _with_features(call, features)
    out["position_ids"] = position_ids
    return Prepared(out, None)


def _shortened(
    plan: VisionLanguagePlan, base: nn.Module, call: dict, features: object | None, is_image: torch.Tensor,
    units: list[int], removed: int,
) -> Prepared:
    """A full prompt: the model's call with the dropped units' placeholders removed."""
    mask = call.get("attention_mask")
    if plan.entry.positions == "mrope":
        features = _run_tower(base, call) if features is None else features
        kept = _kept_units(features)
        counts = torch.tensor(units, device=kept.device)
        starts = counts.cumsum(0) - counts
        chosen = torch.zeros(int(counts.sum()), dtype=torch.bool, device=is_image.device)
        chosen[(starts[:, None] + kept.clamp(min=0))[kept >= 0]] = True
        rank = is_image.flatten().long().cumsum(0).view_as(is_image) - 1
        cut = shorten_to(~is_image | chosen[rank.clamp(min=0)], mask, is_image, int(counts.sum()), removed)
    else:
        rows = [w for _, w in plan.unit_grids(call)] if plan.entry.layout == "rows" else None
        cut = shorten_images(is_image, [plan.tokens.full(u) for u in units], [plan.tokens.kept(u) for u in units],
                             mask, rows)
    out = {k: v for k, v in call.items()}
    for name, fill in ALONG.items():
        if call.get(name) is not None:
            out[name] = cut.take(call[name], plan.pad_token_id if fill is None else fill)
    if mask is None and cut.padded:
        out["attention_mask"] = cut.real.long()
    real = cut.real if out.get("attention_mask") is None else out["attention_mask"].bool()
    positions = call.get("position_ids")
    if plan.entry.positions == "mrope":
        if positions is None:
            types = call.get("mm_token_type_ids")
            types = is_image.int() if types is None else types
            positions = full_positions(base, call["input_ids"], types, call[plan.entry.grid], mask)
        elif positions.dim() != 3 or positions.shape[0] not in (3, 4):
            raise ValueError(
                f"pruneattn: position_ids must be the model's 3-D positions (3 or 4, batch, tokens), got "
                f"{tuple(positions.shape)}"
            )
        positions = positions[-3:]
        out["position_ids"], base.rope_deltas = with_text_row(take_rows(positions, cut.source, real), real)
        out = _with_features(out, features)
    elif positions is not None:
        if positions.dim() != 2:
            raise ValueError(f"pruneattn: position_ids must be (batch, tokens) for this model, got {tuple(positions.shape)}")
        out["position_ids"] = cut.positions(positions)
    return Prepared(out, CallerView(cut))


def _continuation(plan: VisionLanguagePlan, call: dict) -> Prepared | None:
    """A call without images that continues a cache: mapped onto the model's sequence where the cache
    holds a shortened prompt and the call is written against the caller's; refused where the call's
    mask cannot belong to the model's cache."""
    cache = cache_of(call)
    past = cached_length(cache)
    ids = call.get("input_ids", call.get("inputs_embeds"))
    mask = call.get("attention_mask")
    if not past or ids is None:
        return None
    given = isinstance(mask, torch.Tensor) and mask.dim() == 2
    view = view_of(cache)
    if view is None:
        if given and ids.shape[1] < mask.shape[1] and mask.shape[1] != past + ids.shape[1]:
            raise ValueError(
                f"pruneattn: the attention mask covers {mask.shape[1]} tokens, but the cache holds {past} and the call "
                f"adds {ids.shape[1]}: it counts a prompt this model shortened. Continue with the cache that call "
                "returned (pruneattn maps it), or plan the prompts with pruneattn.patch_processor"
            )
        return None
    if call.get("position_ids") is not None:
        raise ValueError(
            "pruneattn: this call continues a cache of a shortened prompt and passes position_ids written against "
            "the caller's sequence; pass none (the model continues its own), or plan the prompts with "
            "pruneattn.patch_processor"
        )
    length = mask.shape[1] if given else ids.shape[1]
    out = dict(call)
    if not given and length <= past:
        return Prepared(out, view)  # only new tokens and no mask: nothing written against the caller's sequence
    for name, fill in ALONG.items():
        t = call.get(name)
        if t is not None and t.shape[1] == length:
            out[name] = view.to_model(t, plan.pad_token_id if fill is None else fill)
    if given and ids.shape[1] < length and out["attention_mask"].shape[1] != past + ids.shape[1]:
        raise ValueError(
            f"pruneattn: the attention mask covers {length} tokens of the conversation as the caller wrote it, "
            f"{out['attention_mask'].shape[1]} of the model's, but the cache holds {past} and the call adds "
            f"{ids.shape[1]}; pass the mask of the whole conversation so far"
        )
    return Prepared(out, view)
