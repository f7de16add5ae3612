"""Connectors that join an m x m window of patches into one language-model token, fed the kept units.

A patched tower of these models keeps whole units (:mod:`pruneattn.patch.units`): its output holds each
image's kept units one after the other, each unit's m * m patches in raster order within it. The base
model's ``get_image_features`` is swapped for one that runs the tower and hands each run of m * m tokens
to the model's own connector in the order it reads them:

- InternVL: the model's ``pixel_shuffle`` on the kept units laid side by side (a grid m rows high and
  m * k columns wide, so its m x m windows are the kept units in order), then its projector;
- Gemma 3: the mean of each unit's 16 patches (the 4 x 4 average pool), then the projector's norm and
  projection;
- Mistral 3: the model's projector (norm, patch merger, MLP) on each image's kept units laid side by side
  the same way (the merger unfolds m x m windows of each image's grid);
- Idefics3 / SmolVLM: each unit's patches concatenated in raster order (the channel order of its pixel
  shuffle), then the connector's projection.

Everything else is the model's. A call that asks for another feature layer than the patch was made for
is refused.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils.generic import can_return_tuple

from pruneattn.patch.swap import Swapped
from pruneattn.patch.units import side_of
from pruneattn.patch.vlm.tokens import VisionLanguagePlan


def side_by_side(units: torch.Tensor, m: int) -> torch.Tensor:
    """(..., k * m * m, C) tokens, k units of m x m patches each in raster order, as a grid (..., m, k * m, C)
    whose m x m windows are the units in order."""
    *lead, T, C = units.shape
    k = T // (m * m)
    return units.reshape(*lead, k, m, m, C).transpose(-4, -3).reshape(*lead, m, k * m, C)


def _internvl(base: nn.Module, plan: VisionLanguagePlan, pixel_values: torch.Tensor, **kwargs) -> object:
    layer = plan.feature_layer
    if layer != -1:
        kwargs["output_hidden_states"] = True
    out = base.vision_tower(pixel_values=pixel_values.to(dtype=base.dtype), return_dict=True, **kwargs)
    features = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
    if plan.select_strategy == "default":
        features = features[:, 1:]
    grid = side_by_side(features, side_of(plan.unit))
    merged = base.pixel_shuffle(grid, scale_factor=base.config.downsample_ratio)
    out.pooler_output = base.multi_modal_projector(merged.flatten(1, 2))
    return out


def _gemma3(base: nn.Module, plan: VisionLanguagePlan, pixel_values: torch.Tensor, **kwargs) -> object:
    out = base.vision_tower(pixel_values=pixel_values, return_dict=True, **kwargs)
    features = out.last_hidden_state
    pooled = features.unflatten(1, (-1, plan.unit)).mean(dim=2)
    projector = base.multi_modal_projector
    normed = projector.mm_soft_emb_norm(pooled)
    out.pooler_output = torch.matmul(normed, projector.mm_input_projection_weight).type_as(features)
    return out


def _mistral3(
    base: nn.Module, plan: VisionLanguagePlan, pixel_values: torch.Tensor, image_sizes: torch.Tensor, **kwargs
) -> object:
    out = base.vision_tower(pixel_values, image_sizes=image_sizes, return_dict=True, **kwargs)
    m, p = side_of(plan.unit), plan.patch_size
    counts = [plan.tokens.kept(u) for u in plan.units({"image_sizes": image_sizes}, len(image_sizes))]
    pieces = out.last_hidden_state[0].split([k * plan.unit for k in counts])
    grids = torch.cat([side_by_side(piece, m).flatten(0, 1) for piece in pieces])
    sizes = torch.tensor([[m * p, k * m * p] for k in counts], device=grids.device)
    merged = base.multi_modal_projector(grids, sizes)
    out.pooler_output = torch.split(merged, counts)
    return out


def _pixel_shuffle(
    base: nn.Module, plan: VisionLanguagePlan, pixel_values: torch.Tensor,
    pixel_attention_mask: torch.Tensor | None = None, **kwargs,
) -> object:
    prompts, slots = pixel_values.shape[:2]
    pixels = pixel_values.to(dtype=base.dtype).flatten(0, 1)
    real = (pixels != 0).flatten(1).any(dim=1)  # all-zero images pad the prompts' image slots
    real[0] |= ~real.any()  # no image at all: the first slot runs, as in the model
    if pixel_attention_mask is not None:
        mask = pixel_attention_mask.flatten(0, 1)[real]
        if not bool(mask.all()):
            raise ValueError(
                "pruneattn: these images are padded inside their tiles (pixel_attention_mask), and the connector "
                "joins whole windows of each tile's square grid; pass the processor's tiles (image splitting "
                "resizes every tile to the full tile size)"
            )
    per_prompt = real.view(prompts, slots).sum(dim=1).tolist()
    out = base.vision_model(pixel_values=pixels[real], return_dict=True, **kwargs)
    features = out.last_hidden_state
    merged = features.reshape(features.shape[0], -1, plan.unit * features.shape[-1])
    projected = base.connector.modality_projection(merged)
    out.pooler_output = [f.reshape(-1, f.shape[-1]) for f in projected.split(per_prompt)]
    return out


def _internvl_side(config: object) -> int:
    return round(1 / config.downsample_ratio)


def _gemma3_side(config: object) -> int:
    vc = config.vision_config
    return (vc.image_size // vc.patch_size) // round(config.mm_tokens_per_image**0.5)


def _check_internvl(config: object, depth: int) -> None:
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError("pruneattn.patch: InternVL reads one vision_feature_layer (an int)")
    if config.vision_feature_select_strategy != "default":
        raise ValueError(
            "pruneattn.patch: InternVL's pixel shuffle reads the patch grid without the class token "
            "(vision_feature_select_strategy='default')"
        )


def _check_mistral3(config: object, depth: int) -> None:
    layer = config.vision_feature_layer
    if not isinstance(layer, int) or layer % (depth + 1) != depth:
        raise ValueError(
            f"pruneattn.patch: a patched Mistral 3 reads its tower's last block (vision_feature_layer=-1); this one "
            f"reads {layer!r}, whose tokens its packed tower does not return per image after a pruning block"
        )


def _no_check(config: object, depth: int) -> None:
    return None


def _connect(base: nn.Module, features: Callable[..., object], call: dict) -> object:
    """The base model's ``get_image_features`` for a call (its arguments by name): per-call settings it was
    not patched for are refused; ``features`` makes the output."""
    plan: VisionLanguagePlan = base._pruneattn_vlm
    for name, patched in (("vision_feature_layer", plan.feature_layer),
                          ("vision_feature_select_strategy", plan.select_strategy)):
        asked = call.pop(name, None)
        if asked is not None and asked != patched:
            raise ValueError(
                f"pruneattn: this model was patched for {name}={patched!r}; the call asks for {asked!r}. Patch it "
                f"again after setting config.{name}"
            )
    return features(base, plan, **call)


# Swapped into the base model; each keeps its model's signature (generate reads it to encode the images) and
# takes return_dict from the call, else from the config, as the model's own method does.
class InternVLKeptUnits(Swapped):
    keeps_name = True

    @can_return_tuple
    def get_image_features(self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs):
        return _connect(self, _internvl, dict(kwargs, pixel_values=pixel_values, vision_feature_layer=vision_feature_layer,
                                              vision_feature_select_strategy=vision_feature_select_strategy))


class Gemma3KeptUnits(Swapped):
    keeps_name = True

    @can_return_tuple
    def get_image_features(self, pixel_values, **kwargs):
        return _connect(self, _gemma3, dict(kwargs, pixel_values=pixel_values))


class Mistral3KeptUnits(Swapped):
    keeps_name = True

    @can_return_tuple
    def get_image_features(self, pixel_values, image_sizes, vision_feature_layer=None, **kwargs):
        return _connect(self, _mistral3, dict(kwargs, pixel_values=pixel_values, image_sizes=image_sizes,
                                              vision_feature_layer=vision_feature_layer))


class PixelShuffleKeptUnits(Swapped):
    keeps_name = True

    @can_return_tuple
    def get_image_features(self, pixel_values, pixel_attention_mask=None, **kwargs):
        return _connect(self, _pixel_shuffle, dict(kwargs, pixel_values=pixel_values,
                                                   pixel_attention_mask=pixel_attention_mask))


@dataclass(frozen=True)
class Connector:
    """One model family's connector: its window side m, what the patch refuses, and the base model's mixin."""

    side: Callable[[object], int]  # m, from the model's config
    check: Callable[[object, int], None]  # (config, tower depth): raises before any change
    mixin: type  # swapped into the base model: its get_image_features feeds the connector the kept units


CONNECTORS: dict[str, Connector] = {
    "internvl": Connector(_internvl_side, _check_internvl, InternVLKeptUnits),
    "gemma3": Connector(_gemma3_side, _no_check, Gemma3KeptUnits),
    "mistral3": Connector(lambda config: int(config.spatial_merge_size), _check_mistral3, Mistral3KeptUnits),
    "pixel_shuffle": Connector(lambda config: int(config.scale_factor), _no_check, PixelShuffleKeptUnits),
}
