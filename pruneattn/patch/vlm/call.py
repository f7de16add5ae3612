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
  full-length ids and mask) is mapped exactly (:mod:`pruneattn.patch.vlm.continuation`).
- any other count is refused before any work, as the unpatched model refuses it.

:func:`prepare` returns the model's call, or None where the call is the model's already.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from pruneattn.patch.vlm.checks import check_settings, images_of, placeholders, refuse_new_image
from pruneattn.patch.vlm.continuation import cache_of, cached_length, continuation, view_of
from pruneattn.patch.vlm.layout import ALONG, CallerView, expand, shorten_images, shorten_to
from pruneattn.patch.vlm.positions import full_positions, take_rows, with_text_row
from pruneattn.patch.vlm.tokens import VisionLanguagePlan



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
        mapped = continuation(plan, call)
        return None if mapped is None else Prepared(*mapped)
    if call.get("input_ids") is None and call.get("inputs_embeds") is None:
        return None  # the model says what it needs
    check_settings(plan, call)
    images, given = feature_rows(features) if features is not None else (images_of(plan, call, pixels), None)
    cache = cache_of(call)
    past = cached_length(cache)
    if past and view_of(cache) is not None:
        refuse_new_image(plan, cache, True)
    is_image = placeholders(plan, base, call, past)
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
        refuse_new_image(plan, cache, found == full)
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
