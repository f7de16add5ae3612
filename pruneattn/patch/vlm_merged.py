"""Vision-language models whose connector merges units of patches and whose positions are 3-D (M-RoPE):
Hugging Face Qwen2-VL and Qwen2.5-VL.

Pruning sits in the tower's last block (a full-attention block, :mod:`pruneattn.patch.windowed`): each
image keeps k = ceil(rate * units) of its merged units (``tokens=k``: at most k), scored by the
statistic over heads of a unit's summed received attention. The merger merges the kept units only.

A call with images is prepared once, before the model reads it (a forward pre-hook of the generation
model, and of the base model for calls to it directly): the tower runs on ``pixel_values``; the
caller's full prompt gets its (t, h, w) position ids from the model's own ``get_rope_index``; the
placeholders of the dropped units are removed from the prompt and from every tensor that runs along
it (ids, attention mask, token types, labels, positions), rows padded again on their mask's side; the
model then gets the kept units' features as ``mm_encoder_outputs`` and the positions as
``position_ids`` (the text row first, as ``generate`` builds them). So every kept token keeps its
original position id, text after an image keeps its unpruned ids, and decoding continues from each
row's largest id + 1 (``rope_deltas`` are set to match for calls that pass no positions).
``generate`` prepares the prompt once, generates, and returns the caller's prompt followed by the new
tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pruneattn.patch import check_encoder, kept_indices, unpatch
from pruneattn.patch import registry
from pruneattn.patch.prompt import Shortening, shorten_to
from pruneattn.patch.registry import VisionLanguage
from pruneattn.patch.state import ScoreHook
from pruneattn.patch.swap import Swapped, swap
from pruneattn.patch.vlm import _SHORT, _arguments, _base, generate_shortened


@dataclass(frozen=True)
class MergedPrompt:
    """What a patched model needs to prepare a call (frozen, on the base model)."""

    image_token_id: int
    pad_token_id: int
    unit: int  # patches per merged unit


def patch(
    model: nn.Module, entry: VisionLanguage, keep_rate: object, tokens: object, layers: object, stat: str,
    query: str | None, mode: str, score_hook: ScoreHook | None,
) -> nn.Module:
    """``pruneattn.patch`` of a Qwen2-VL / Qwen2.5-VL model (see the module docstring); raises before any change."""
    base = _base(model, entry)
    tower = base.visual
    family = registry.family_of(tower)
    if family is None or family.label not in entry.towers:
        raise TypeError(
            f"pruneattn.patch: this {type(model).__name__} has a {type(tower).__name__} vision tower; pruneattn "
            f"prunes {entry.label} models with a {registry.family_named(entry.towers[0]).encoder[0]}"
        )
    depth = len(registry.blocks_of(family, tower))
    if layers is None:
        layers = (depth - 1,)
    checked = check_encoder(tower, family, keep_rate, tokens, layers, stat, query, mode, score_hook)
    config = base.config
    text = config.get_text_config()
    prompt = MergedPrompt(
        image_token_id=int(config.image_token_id),
        pad_token_id=int(getattr(text, "pad_token_id", None) or getattr(config, "pad_token_id", None) or 0),
        unit=registry.unit_of(family, tower),
    )
    unpatch(model)
    checked.apply()
    base._pruneattn_prompt = prompt
    base._pruneattn_hooks = (base.register_forward_pre_hook(_prepare_base, with_kwargs=True),)
    if model is not base:
        model.__dict__["_pruneattn_base"] = base  # not a submodule: the base is already one
        model._pruneattn_hooks = (model.register_forward_pre_hook(_prepare_model, with_kwargs=True),)
        if hasattr(model, "generate"):
            swap(model, PrunedMergedGeneration)
    return model


def _check_call(call: dict) -> None:
    if call.get("pixel_values_videos") is not None:
        raise ValueError(
            "pruneattn: a patched Qwen2-VL / Qwen2.5-VL prunes image tokens; videos (pixel_values_videos) are not "
            "supported. "
            "Unpatch the model (pruneattn.unpatch) for video prompts"
        )
    if call.get("input_ids") is None:
        raise ValueError("pruneattn: pass the processor's input_ids with pixel_values (not inputs_embeds)")
    mask = call.get("attention_mask")
    if isinstance(mask, torch.Tensor) and (mask.dim() != 2 or mask.shape != call["input_ids"].shape):
        raise ValueError("pruneattn: pass the processor's 2-D attention_mask (batch, tokens) for the whole prompt")
    cache = call.get("cache", call.get("past_key_values"))
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError(
            "pruneattn: a cache continued with a new image is not supported; pass the whole conversation"
        )


def prepare(base: nn.Module, call: dict) -> tuple[dict, Shortening, int] | None:
    """The call with its images pruned (see the module docstring), its shortening and the placeholders
    removed; None where it holds no image."""
    if id(base) in _SHORT.get() or call.get("pixel_values") is None:
        return None
    _check_call(call)
    prompt: MergedPrompt = base._pruneattn_prompt
    ids, grid, mask = call["input_ids"], call.get("image_grid_thw"), call.get("attention_mask")
    if grid is None:
        raise ValueError("pruneattn: pass the processor's image_grid_thw with pixel_values")
    units = grid.prod(-1) // prompt.unit
    is_image = ids == prompt.image_token_id
    found, total = int(is_image.sum()), int(units.sum())
    if found != total:
        raise ValueError(
            f"pruneattn: the prompts hold {found} image placeholder tokens where image_grid_thw makes {total} merged "
            "tokens; pass the processor's input_ids as they are"
        )
    tower = base.visual
    encoded = tower(call["pixel_values"].type(tower.dtype), grid_thw=grid)
    kept = next(reversed(kept_indices(tower).values()))  # (images, k): the last pruning block's
    counts = (kept >= 0).sum(dim=1)
    # Positions of the full prompt, as the unpatched model computes them.
    types = call.get("mm_token_type_ids")
    if types is None:
        types = is_image.int()
    positions = call.get("position_ids")
    if positions is None:
        positions, _ = base.get_rope_index(ids, types, image_grid_thw=grid, attention_mask=mask)
    elif positions.dim() != 3 or positions.shape[0] not in (3, 4):
        raise ValueError(
            f"pruneattn: position_ids must be the model's 3-D positions (3 or 4, batch, tokens), got {tuple(positions.shape)}"
        )
    elif positions.shape[0] == 4:  # the text row first, as generate builds them
        positions = positions[1:]
    # The kept units' placeholders: each image's placeholders are its units in raster order.
    starts = torch.cumsum(units, 0) - units
    flat = torch.zeros(total, dtype=torch.bool, device=ids.device)
    hits = (starts[:, None] + kept.clamp(min=0))[kept >= 0]
    flat[hits] = True
    rank = is_image.flatten().long().cumsum(0).view_as(ids) - 1
    stays = ~is_image | flat[rank.clamp(min=0)]
    removed = total - int(counts.sum())
    cut = shorten_to(stays, mask, is_image, total, removed)
    out = dict(call)
    out["input_ids"] = cut.take(ids, prompt.pad_token_id)
    short_mask = cut.take(mask, 0) if mask is not None else (cut.real.long() if cut.padded else None)
    out["attention_mask"] = short_mask
    out["mm_token_type_ids"] = cut.take(types, 0)
    pos = cut.take(positions.permute(1, 2, 0), 1).permute(2, 0, 1)  # (3, B, L')
    real = cut.real if short_mask is None else short_mask.bool()
    text = (real.long().cumsum(-1) - 1).clamp(min=0)
    out["position_ids"] = torch.cat([text[None], pos])
    split = encoded.pooler_output.split(counts.tolist())
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    out["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(
        last_hidden_state=encoded.last_hidden_state, pooler_output=split)}
    del out["pixel_values"]
    largest = pos.masked_fill(~real[None], -1).amax(dim=(0, 2))
    base.rope_deltas = (largest + 1 - real.sum(dim=1)).view(-1, 1)
    return out, cut, removed


def _prepare_base(base: nn.Module, args: tuple, kwargs: dict):
    prepared = prepare(base, _arguments(base, args, kwargs))
    return None if prepared is None else ((), prepared[0])


def _prepare_model(model: nn.Module, args: tuple, kwargs: dict):
    call = _arguments(model, args, kwargs)
    prepared = prepare(model._pruneattn_base, call)
    if prepared is None:
        return None
    out, cut, _ = prepared
    if call.get("labels") is not None:
        out["labels"] = cut.take(call["labels"], -100)
    return (), out


class PrunedMergedGeneration(Swapped):
    """Swapped into a patched Qwen2-VL / Qwen2.5-VL generation model: ``generate`` prepares the prompt once,
    generates, and returns the caller's prompt followed by the new tokens."""

    keeps_name = True  # transformers writes the class name into saved configs

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        base = self._pruneattn_base
        call = dict(kwargs)
        if inputs is not None:
            call["input_ids"] = inputs
        prepared = prepare(base, call)
        if prepared is None:
            return super().generate(inputs, *args, **kwargs)
        short, cut, _ = prepared
        prompt_ids = call["input_ids"]
        return generate_shortened(
            self, super().generate, base, short, args, prompt_ids, prompt_ids.shape[1], cut.length
        )
