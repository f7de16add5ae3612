"""Vision-language models: prune the image tokens their language model reads.

Pruning sits in the vision tower's *feature layer*, the block whose output the model reads (LLaVA,
InternVL: ``hidden_states[vision_feature_layer]``; PaliGemma, Gemma 3, Mistral 3, Idefics3 / SmolVLM and
the M-RoPE families (Qwen2-VL to Qwen3.5, GLM-4.xV): the last block): after that block's attention the
tower keeps k units per image or tile (patches, or the windows of patches that the model's connector
joins into one token: the M-RoPE families' 2 x 2 merged units, :mod:`pruneattn.patch.units` for the
others), scored by pruneattn's fused attention, in raster order. The tower is patched as any encoder of
its family; nothing runs eager attention.

Every family goes one path:

- :mod:`~pruneattn.patch.vlm.tokens`: how many tokens an image yields, unpruned and kept (its size and
  the settings decide it, never its content);
- :mod:`~pruneattn.patch.vlm.processor`: ``pruneattn.patch_processor`` makes the processor write that
  count (the planned prompt), so that the caller's sequence is the model's;
- :mod:`~pruneattn.patch.vlm.call`: a forward pre-hook reads each call once: a planned prompt is used as
  it is (M-RoPE models get their kept tokens' original ids), a full prompt is shortened, any other
  count is refused as the unpatched model refuses it;
- :mod:`~pruneattn.patch.vlm.generation`: ``generate`` reads its call once and keeps everything that
  reads the sequence in the caller's terms;
- :mod:`~pruneattn.patch.vlm.connectors`: the models whose connector joins windows of patches get their
  kept units in the order that connector reads them.
"""
from __future__ import annotations

import gc
from dataclasses import replace

from torch import nn

from pruneattn.patch import registry, unpatch
from pruneattn.patch.context import CallLocal
from pruneattn.patch.options import Options, check_fits
from pruneattn.patch.plan import plan_encoder
from pruneattn.patch.registry import VisionLanguage
from pruneattn.patch.swap import swap
from pruneattn.patch.vlm.call import arguments, prepare
from pruneattn.patch.vlm.connectors import CONNECTORS
from pruneattn.patch.vlm.continuation import remember
from pruneattn.patch.vlm.features import SplitsKeptUnits
from pruneattn.patch.vlm.generation import PrunedGeneration
from pruneattn.patch.vlm.scope import already_read, enter, leave
from pruneattn.patch.vlm.tokens import ImageTokens, VisionLanguagePlan

__all__ = ["patch"]


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


def _pad_token_id(*configs: object) -> int:
    """The first pad token id the configs set (the language model's first; id 0 counts), else 0."""
    return next((int(p) for p in (getattr(c, "pad_token_id", None) for c in configs) if p is not None), 0)


def _square(size: object) -> int:
    """One side of a config's image or patch size (an int, or a square (height, width))."""
    if isinstance(size, int):
        return size
    height, width = size
    if height != width:
        raise ValueError(f"pruneattn.patch: expected a square image and patch size in the vision config, got {size!r}")
    return int(height)


def _has_class(module: object, name: str) -> bool:
    return any(c.__name__ == name for c in type(module).__mro__)


def _base(model: nn.Module, entry: VisionLanguage) -> nn.Module:
    if _has_class(model, entry.base):
        return model
    found = [m for m in model.modules() if _has_class(m, entry.base)]
    if len(found) != 1:
        raise TypeError(f"pruneattn.patch: expected one {entry.base} in this {type(model).__name__}, found {len(found)}")
    return found[0]


def _holders(module: nn.Module) -> list[nn.Module]:
    """The modules that hold ``module`` as a direct submodule. PyTorch keeps no link from a module to the
    modules holding it, so the garbage collector's referrers are searched: ``module`` is a value of a
    holder's ``_modules`` dict, which that holder (or its ``__dict__``) refers to."""
    holders = []
    for table in gc.get_referrers(module):
        if not isinstance(table, dict):
            continue
        for ref in gc.get_referrers(table):
            owners = [ref] if isinstance(ref, nn.Module) else gc.get_referrers(ref) if isinstance(ref, dict) else []
            holders += [m for m in owners if isinstance(m, nn.Module) and m.__dict__.get("_modules") is table]
    return holders


def _refuse_base_inside(model: nn.Module, base: nn.Module, entry: VisionLanguage) -> None:
    """A base model patched alone inside its generation model: that model's ``generate`` and loss would read
    a prompt the base shortens behind their back."""
    if model is not base:
        return
    outer = [m for m in _holders(base) if any(_has_class(m, name) for name in entry.models if name != entry.base)]
    if outer:
        name = type(outer[0]).__name__
        raise TypeError(
            f"pruneattn.patch: this {type(base).__name__} is the base model of a {name}, whose generate and loss "
            f"read the prompt too; patch the {name} itself (pruneattn.patch(model))"
        )


def patch(model: nn.Module, entry: VisionLanguage, options: Options) -> nn.Module:
    """``pruneattn.patch`` of a vision-language model (see the module docstring); raises before any change."""
    base = _base(model, entry)
    _refuse_base_inside(model, base, entry)
    tower = getattr(base, entry.tower)
    family = registry.family_of(tower)
    if family is None or family.label not in entry.towers:
        towers = " or ".join(registry.family_named(t).encoder[0] for t in entry.towers)
        raise TypeError(
            f"pruneattn.patch: this {type(model).__name__} has a {type(tower).__name__} vision tower; pruneattn "
            f"prunes {entry.label} models with a {towers}"
        )
    encoder = registry.describe(tower)
    config = base.config
    depth = len(encoder.blocks)
    connector = None if entry.connector is None else CONNECTORS[entry.connector]
    if connector is not None:  # its connector joins m x m windows: they are scored and kept whole
        connector.check(config, depth)
        encoder = replace(encoder, unit=connector.side(config) ** 2)
        if options.mode == "fuse":
            raise ValueError(
                f"pruneattn.patch: mode='fuse' is not available for {type(model).__name__}: its connector joins whole "
                "windows of patches, and a fused token is no window; use mode='drop'"
            )
    feature_layer = None if entry.feature_layer is None else getattr(config, entry.feature_layer)
    strategy = None if entry.select_strategy is None else getattr(config, entry.select_strategy)
    if strategy not in (None, "default", "full"):
        raise ValueError(f"pruneattn.patch: unknown vision_feature_select_strategy {strategy!r}")
    first = min([depth - 1] if feature_layer is None else _feature_blocks(feature_layer, depth))
    tower_plan = plan_encoder(encoder, options if options.layers is not None else replace(options, layers=(first,)))
    if tower_plan.layers[-1] > first:
        raise ValueError(
            f"pruneattn.patch: the model reads the output of tower block {first}"
            f"{' (and later ones)' if feature_layer is not None and not isinstance(feature_layer, int) else ''}, so "
            f"every pruning block must be at or before it; got layers {list(tower_plan.layers)}"
        )
    vc = config.vision_config
    fixed = entry.grid is None and entry.sizes is None
    patch_size = _square(vc.patch_size)
    image_size = _square(vc.image_size) if fixed else None
    if fixed:
        check_fits((image_size // patch_size) ** 2 // encoder.unit, tower_plan.amounts)
    text = config.get_text_config()
    plan = VisionLanguagePlan(
        entry=entry,
        tokens=ImageTokens(tower_plan.amounts, int(encoder.class_token) - int(strategy == "default"), tower_plan.fused),
        image_token_id=int(config.image_token_id),
        pad_token_id=_pad_token_id(text, config),
        unit=encoder.unit,
        patch_size=patch_size,
        image_size=image_size,
        channels=int(getattr(vc, "num_channels", 3)),
        feature_layer=tuple(feature_layer) if isinstance(feature_layer, list) else feature_layer,
        select_strategy=strategy,
    )
    unpatch(model)
    tower_plan.apply()
    base._pruneattn_vlm = plan
    if connector is not None:
        swap(base, connector.mixin)
    elif not fixed:
        swap(base, SplitsKeptUnits)
    _hook(base)
    if model is not base:
        model.__dict__["_pruneattn_base"] = base  # not a submodule: the base is already one
        _hook(model)
        if hasattr(model, "generate"):
            swap(model, PrunedGeneration)
    return model


# ----------------------------------------------------------------------------- forward hooks

# One entry per running forward of a patched model (innermost last): [scope token, token of this
# stack before it, the call's view or None], for ``_done``.
_FORWARDS: CallLocal[tuple[list, ...]] = CallLocal("pruneattn_vlm_forwards", default=())


def _read(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: the model's call for this call (see :func:`pruneattn.patch.vlm.call.prepare`). Its
    entry is pushed first: the forward hook pops it even where reading the call raises."""
    base = module.__dict__.get("_pruneattn_base", module)
    done = already_read(base)
    entry = [enter(base), None, None]
    entry[1] = _FORWARDS.set((*_FORWARDS.get(), entry))
    prepared = None if done else prepare(base._pruneattn_vlm, base, arguments(module, args, kwargs))
    if prepared is None:
        return None
    entry[2] = prepared.view
    return (), prepared.call


def _done(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
    """Forward hook (also after an error): the call's map goes with the cache it returns."""
    scope, before, view = _FORWARDS.get()[-1]
    _FORWARDS.reset(before)
    leave(scope)
    if view is not None and output is not None:
        cache = getattr(output, "cache", None)
        remember(cache if cache is not None else getattr(output, "past_key_values", None), view)


def _hook(module: nn.Module) -> None:
    module._pruneattn_hooks = (
        module.register_forward_pre_hook(_read, with_kwargs=True),
        module.register_forward_hook(_done, with_kwargs=True, always_call=True),
    )
