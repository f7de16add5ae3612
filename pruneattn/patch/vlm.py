"""Vision-language models (Hugging Face LLaVA, PaliGemma): prune the image tokens their language model reads.

Pruning sits in the vision tower's *feature layer*, the block whose output the model projects (LLaVA:
``hidden_states[vision_feature_layer]``, PaliGemma: the last block): after that block's attention,
the tower keeps k patches per image (``tokens=k``, or ``keep_rate``), scored by pruneattn's fused
attention, in raster order. Blocks after it run on the kept tokens only. The tower is patched as any
Hugging Face CLIP / SigLIP encoder (:mod:`pruneattn.patch.hf`); nothing runs eager attention.

The caller's prompt still holds the processor's count of placeholders per image. Forward pre-hooks
shorten it, per call, before the model reads it (:mod:`pruneattn.patch.prompt`): the base model's hook
(``LlavaModel`` / ``PaliGemmaModel``) takes ``input_ids`` or ``inputs_embeds``, ``attention_mask``,
``position_ids`` and ``token_type_ids``, the generation model's hook takes ``labels``. Each image then
occupies as many contiguous positions as it has tokens. ``generate`` shortens the prompt once, runs as
usual (the cache holds the shortened sequence), and returns the caller's prompt followed by the new
tokens. Weights and classes other than the generation model's (``generate``) are unchanged.

Models whose connector merges units of patches and whose positions are 3-D (Qwen2-VL, Qwen2.5-VL) are
:mod:`pruneattn.patch.vlm_merged`.
"""
from __future__ import annotations

import contextvars
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pruneattn.patch import Amount, check_encoder, kept_after, unpatch
from pruneattn.patch import registry
from pruneattn.patch.prompt import Shortening, shorten
from pruneattn.patch.registry import VisionLanguage
from pruneattn.patch.state import ScoreHook
from pruneattn.patch.swap import Swapped, swap

# The base models whose prompts are already shortened in this context (set by ``generate`` around its
# loop, which shortens the prompt once itself).
_SHORT: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("pruneattn_short_prompt", default=frozenset())


@dataclass(frozen=True)
class PromptConfig:
    """What a patched vision-language model needs to shorten a prompt (frozen, on the base model)."""

    image_token_id: int
    pad_token_id: int
    patch_size: int
    class_token: bool  # the tower's output starts with a class token
    drops_first: bool  # LLaVA's "default" strategy drops the tower's first token
    amounts: tuple[Amount, ...]  # of the tower's pruning blocks, in order
    fused: bool  # a fused token is appended
    feature_layer: int | tuple[int, ...] | None  # as configured (a call must not ask for another)
    select_strategy: str | None

    def tokens_per_image(self, h: int, w: int) -> tuple[int, int]:
        """(placeholders per image in the caller's prompt, tokens per image after pruning), for h x w images."""
        patches = (h // self.patch_size) * (w // self.patch_size)
        extra = int(self.class_token) - int(self.drops_first)
        return patches + extra, kept_after(patches, self.amounts) + int(self.fused) + extra


def _feature_blocks(feature_layer: object, depth: int) -> list[int]:
    """Tower block indices whose outputs ``hidden_states[feature_layer]`` are (0 is the embeddings)."""
    layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    blocks = []
    for f in layers:
        if not isinstance(f, int) or not -(depth + 1) <= f <= depth:
            raise ValueError(f"pruneattn.patch: vision_feature_layer {f!r} is not a hidden state of this {depth}-block tower")
        i = f % (depth + 1)
        if i == 0:
            raise ValueError(
                "pruneattn.patch: vision_feature_layer 0 reads the tower's embeddings, before any block, so there is "
                "no attention to prune in"
            )
        blocks.append(i - 1)
    return blocks


def _base(model: nn.Module, entry: VisionLanguage) -> nn.Module:
    if any(c.__name__ == entry.base for c in type(model).__mro__):
        return model
    found = [m for m in model.modules() if any(c.__name__ == entry.base for c in type(m).__mro__)]
    if len(found) != 1:
        raise TypeError(f"pruneattn.patch: expected one {entry.base} in this {type(model).__name__}, found {len(found)}")
    return found[0]


def patch(
    model: nn.Module,
    entry: VisionLanguage,
    keep_rate: object,
    tokens: object,
    layers: object,
    stat: str,
    query: str | None,
    mode: str,
    score_hook: ScoreHook | None,
) -> nn.Module:
    """``pruneattn.patch`` of a vision-language model (see the module docstring); raises before any change."""
    if entry.merged:
        from pruneattn.patch import vlm_merged

        return vlm_merged.patch(model, entry, keep_rate, tokens, layers, stat, query, mode, score_hook)
    base = _base(model, entry)
    config = base.config
    tower = base.vision_tower
    family = registry.family_of(tower)
    if family is None or family.label not in entry.towers:
        raise TypeError(
            f"pruneattn.patch: this {type(model).__name__} has a {type(tower).__name__} vision tower; pruneattn "
            f"prunes {entry.label} models with a {' or '.join(registry.family_named(t).encoder[0] for t in entry.towers)}"
        )
    depth = len(registry.blocks_of(family, tower))
    feature_layer = None if entry.feature_layer is None else getattr(config, entry.feature_layer)
    strategy = None if entry.select_strategy is None else getattr(config, entry.select_strategy)
    if strategy not in (None, "default", "full"):
        raise ValueError(f"pruneattn.patch: unknown vision_feature_select_strategy {strategy!r}")
    features = [depth - 1] if feature_layer is None else _feature_blocks(feature_layer, depth)
    first = min(features)
    if layers is None:
        layers = (first,)
    checked = check_encoder(tower, family, keep_rate, tokens, layers, stat, query, mode, score_hook)
    if checked.layers[-1] > first:
        raise ValueError(
            f"pruneattn.patch: the model reads the output of tower block {first}"
            f"{' (and later ones)' if len(features) > 1 else ''}, so every pruning block must be at or before it; "
            f"got layers {list(checked.layers)}"
        )
    vc = config.vision_config
    patches = (vc.image_size // vc.patch_size) ** 2
    kept_after(patches, checked.amounts)  # tokens= no larger than the tower's patch count
    class_token = bool(family.class_token)
    text = config.get_text_config()
    prompt = PromptConfig(
        image_token_id=int(config.image_token_id),
        pad_token_id=int(getattr(text, "pad_token_id", None) or getattr(config, "pad_token_id", None) or 0),
        patch_size=int(vc.patch_size),
        class_token=class_token,
        drops_first=strategy == "default",
        amounts=checked.amounts,
        fused=mode == "fuse" and any(a.selects for a in checked.amounts),
        feature_layer=feature_layer if not isinstance(feature_layer, Sequence) else tuple(feature_layer),
        select_strategy=strategy,
    )
    unpatch(model)
    checked.apply()
    base._pruneattn_prompt = prompt
    base._pruneattn_hooks = (base.register_forward_pre_hook(_shorten_base, with_kwargs=True),)
    if model is not base:
        model.__dict__["_pruneattn_base"] = base  # not a submodule: the base is already one
        model._pruneattn_hooks = (model.register_forward_pre_hook(_shorten_labels, with_kwargs=True),)
        if hasattr(model, "generate"):
            swap(model, PrunedGeneration)
    return model


# ----------------------------------------------------------------------------- one call


def _arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name (positional ones bound to the forward's parameters)."""
    if not args:
        return dict(kwargs)
    bound = inspect.signature(type(module).forward).bind_partial(module, *args, **kwargs).arguments
    bound.pop("self", None)
    extra = next((n for n, p in inspect.signature(type(module).forward).parameters.items()
                  if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    if extra is not None:
        bound.update(bound.pop(extra, {}))
    return bound


def _check_call(prompt: PromptConfig, call: dict) -> None:
    """Refuse per-call settings the patch was not made for."""
    layer = call.get("vision_feature_layer")
    if layer is not None:
        layer = tuple(layer) if isinstance(layer, Sequence) else layer
        if layer != prompt.feature_layer:
            raise ValueError(
                f"pruneattn: this model was patched for vision_feature_layer={prompt.feature_layer}; the call asks "
                f"for {layer}. Patch it again after setting config.vision_feature_layer"
            )
    strategy = call.get("vision_feature_select_strategy")
    if strategy is not None and strategy != prompt.select_strategy:
        raise ValueError(
            f"pruneattn: this model was patched for vision_feature_select_strategy={prompt.select_strategy!r}; the "
            f"call asks for {strategy!r}. Patch it again after setting config.vision_feature_select_strategy"
        )
    if call.get("image_sizes") is not None:
        raise ValueError("pruneattn: image_sizes (images of several sizes in one tensor) is not supported for this model")


def _image_mask(base: nn.Module, prompt: PromptConfig, call: dict) -> torch.Tensor:
    """(B, L) bool: the image placeholders of the call's prompt (from its ids, else its embeddings)."""
    ids = call.get("input_ids")
    if ids is not None:
        return ids == prompt.image_token_id
    embeds = call["inputs_embeds"]
    image = base.get_input_embeddings()(torch.tensor(prompt.image_token_id, device=embeds.device))
    return (embeds == image.to(embeds.dtype)).all(-1)


def _image_counts(base: nn.Module, prompt: PromptConfig, call: dict) -> tuple[int, int, int] | None:
    """(placeholders per image, tokens per image the language model gets, images) of this call, or None
    where it holds no image. From ``pixel_values``, else from precomputed ``mm_encoder_outputs`` (e.g. the
    patched model's ``get_image_features``), whose features say how many tokens each image kept."""
    pixels = call.get("pixel_values")
    if pixels is not None:
        full, kept = prompt.tokens_per_image(*pixels.shape[-2:])
        return full, kept, pixels.shape[0]
    encoded = call.get("mm_encoder_outputs") or {}
    image = encoded.get("image") if isinstance(encoded, dict) else None
    features = getattr(image, "pooler_output", None)
    if features is None:
        return None
    size = base.config.vision_config.image_size
    full, _ = prompt.tokens_per_image(size, size)
    if isinstance(features, torch.Tensor):  # (images, tokens, C)
        return full, features.shape[1], features.shape[0]
    counts = {f.shape[0] for f in features}  # a list of (tokens, C), one per image
    if len(counts) != 1:
        raise ValueError(f"pruneattn: the images of mm_encoder_outputs hold different token counts {sorted(counts)}")
    return full, counts.pop(), len(features)


def _shortening(base: nn.Module, call: dict) -> Shortening | None:
    """The shortening of this call's prompt, or None where there is nothing to shorten."""
    prompt: PromptConfig = base._pruneattn_prompt
    if id(base) in _SHORT.get():
        return None
    if call.get("input_ids") is None and call.get("inputs_embeds") is None:
        return None
    counts = _image_counts(base, prompt, call)
    if counts is None:
        return None
    _check_call(prompt, call)
    full, kept, num_images = counts
    if full == kept:  # e.g. features an unpatched tower computed: the prompt stays as it is
        return None
    mask = call.get("attention_mask")
    ids = call.get("input_ids")
    length = (ids if ids is not None else call["inputs_embeds"]).shape[1]
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] != length:
        raise ValueError(
            "pruneattn: an attention mask longer than the prompt (a cache continued with a new image) is not "
            "supported; pass the whole conversation"
        )
    if isinstance(mask, torch.Tensor) and mask.dim() != 2:
        raise ValueError("pruneattn: pass the processor's 2-D attention_mask (batch, tokens), not a prepared 4-D mask")
    return shorten(_image_mask(base, prompt, call), full, kept, num_images, mask)


def shortened_call(base: nn.Module, call: dict, cut: Shortening) -> dict:
    """The call's prompt tensors taken through ``cut`` (labels are the generation model's)."""
    prompt: PromptConfig = base._pruneattn_prompt
    out = dict(call)
    if call.get("input_ids") is not None:
        out["input_ids"] = cut.take(call["input_ids"], prompt.pad_token_id)
    if call.get("inputs_embeds") is not None:
        out["inputs_embeds"] = cut.take(call["inputs_embeds"], 0)
    mask = call.get("attention_mask")
    if mask is not None:
        out["attention_mask"] = cut.take(mask, 0)
    elif cut.padded:
        out["attention_mask"] = cut.real.long()
    if call.get("position_ids") is not None:
        pos = call["position_ids"]
        if pos.dim() != 2:
            raise ValueError(f"pruneattn: position_ids must be (batch, tokens) for this model, got {tuple(pos.shape)}")
        out["position_ids"] = cut.positions(pos)
    if call.get("token_type_ids") is not None:
        out["token_type_ids"] = cut.take(call["token_type_ids"], 0)
    return out


def _shorten_base(base: nn.Module, args: tuple, kwargs: dict):
    call = _arguments(base, args, kwargs)
    cut = _shortening(base, call)
    return None if cut is None else ((), shortened_call(base, call, cut))


def _shorten_labels(model: nn.Module, args: tuple, kwargs: dict):
    call = _arguments(model, args, kwargs)
    if call.get("labels") is None:
        return None
    cut = _shortening(model._pruneattn_base, call)
    if cut is None:
        return None
    return (), {**call, "labels": cut.take(call["labels"], -100)}


# ----------------------------------------------------------------------------- generate


def _generation_lengths(model: nn.Module, kwargs: dict, args: tuple, removed: int) -> dict:
    """``max_length`` / ``min_length`` count the prompt: move them back by the removed placeholders."""
    config = kwargs.get("generation_config") or (args[0] if args else None) or model.generation_config
    if kwargs.get("max_new_tokens") is None and getattr(config, "max_new_tokens", None) is None:
        kwargs["max_length"] = max(1, kwargs.get("max_length", config.max_length) - removed)
    min_length = kwargs.get("min_length", getattr(config, "min_length", 0)) or 0
    if min_length:
        kwargs["min_length"] = max(0, min_length - removed)
    return kwargs


class PrunedGeneration(Swapped):
    """Swapped into a patched vision-language generation model: ``generate`` shortens the prompt once,
    generates, and returns the caller's prompt followed by the new tokens."""

    keeps_name = True  # transformers writes the class name into saved configs

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        base = self._pruneattn_base
        call = dict(kwargs)
        if inputs is not None:
            call["input_ids"] = inputs
        cut = _shortening(base, call)
        if cut is None:
            return super().generate(inputs, *args, **kwargs)
        prompt_ids = call.get("input_ids")
        short = shortened_call(base, call, cut)
        length = (prompt_ids if prompt_ids is not None else call["inputs_embeds"]).shape[1]
        return generate_shortened(self, super().generate, base, short, args, prompt_ids, length, cut.length)


def generate_shortened(
    model: nn.Module, run, base: nn.Module, short: dict, args: tuple, prompt_ids: torch.Tensor | None, length: int,
    short_length: int,
):
    """``run`` (the generation model's own ``generate``) on the shortened call ``short``, the prompt of
    ``base`` marked as shortened; returns the caller's prompt ``prompt_ids`` (``length`` long) followed by
    the new tokens (only the new tokens for a prompt given as embeddings, as ``generate`` does)."""
    short = _generation_lengths(model, short, args, length - short_length)
    token = _SHORT.set(_SHORT.get() | {id(base)})
    try:
        out = run(None, *args, **short)
    finally:
        _SHORT.reset(token)
    if prompt_ids is None:  # from embeddings: generate returns the new tokens only
        return out
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    repeats = sequences.shape[0] // prompt_ids.shape[0]
    full = torch.cat([prompt_ids.repeat_interleave(repeats, 0), sequences[:, short_length:]], dim=1)
    if isinstance(out, torch.Tensor):
        return full
    out.sequences = full
    return out
