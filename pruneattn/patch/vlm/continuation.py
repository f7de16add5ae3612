"""Calls that continue a cache, and the map each cache keeps from the caller's sequence to the model's.

A full prompt is shortened for the model (:mod:`pruneattn.patch.vlm.layout`); the cache the model returns
holds the shortened sequence. :func:`remember` keeps the map (a :class:`~pruneattn.patch.vlm.layout.CallerView`)
with that cache object, weakly; :func:`continuation` maps a later call written against the caller's
sequence (its whole conversation so far, or new tokens with its whole mask) onto the model's, and refuses
a mask that counts a shortened prompt where the cache holds no map.
"""
from __future__ import annotations

import weakref

import torch

from pruneattn.patch.vlm.layout import ALONG, CallerView
from pruneattn.patch.vlm.tokens import VisionLanguagePlan

CACHES = ("cache", "past_key_values")


def cache_of(call: dict) -> object | None:
    return next((call[n] for n in CACHES if call.get(n) is not None), None)


def cached_length(cache: object | None) -> int:
    return 0 if cache is None or not hasattr(cache, "get_seq_length") else int(cache.get_seq_length())


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


def continuation(plan: VisionLanguagePlan, call: dict) -> tuple[dict, CallerView] | None:
    """A call without images that continues a cache: its arguments mapped onto the model's sequence, and
    the cache's map, where the cache holds a shortened prompt and the call is written against the caller's;
    None where it needs no change; refused where the call's mask cannot belong to the model's cache."""
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
        return out, view  # only new tokens and no mask: nothing written against the caller's sequence
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
    return out, view
