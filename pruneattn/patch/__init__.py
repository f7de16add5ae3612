"""Drop-in swap for real ViTs and vision-language models: ``patch`` / ``unpatch`` a timm or Hugging Face
model in place.

The chosen blocks get their class swapped to a pruning subclass (as ToMe does): no new parameters,
identical ``state_dict``. Each pruning block holds its frozen settings (``block._pruneattn``); hooks on
the model's encoder give every forward call its kept indices in a state of its own
(:mod:`pruneattn.patch.state`). A ``patch`` call is read once: the registry describes the model
(:func:`pruneattn.patch.registry.describe`), :func:`pruneattn.patch.plan.plan_encoder` checks the options
against it into one frozen plan, and the plan is applied. :mod:`pruneattn.patch.prune` holds the pruning
step; vision-language models (the tower pruned, the prompt planned by the processor or shortened by the
model) are :mod:`pruneattn.patch.vlm`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pruneattn.patch import registry
from pruneattn.patch.options import Options
from pruneattn.patch.plan import default_layers, plan_encoder
from pruneattn.patch.positions import composed_kept
from pruneattn.patch.state import Exported, ForwardFailed, Plan, ScoreHook
from pruneattn.patch.swap import is_swapped, restore

__all__ = ["default_layers", "image_tokens", "kept_indices", "patch", "patch_processor", "unpatch"]


def patch(
    model: nn.Module,
    keep_rate: float | Sequence[float] | None = None,
    layers: int | Sequence[int] | None = None,
    stat: str = "var",
    query: str | None = None,
    mode: str = "drop",
    tokens: int | Sequence[int] | None = None,
    score_hook: ScoreHook | None = None,
) -> nn.Module:
    """Make ``model`` prune patch tokens after the attention of the blocks in ``layers``, in place.

    Args:
        model: a model of one of the families in :mod:`pruneattn.patch.registry` (timm
            ``VisionTransformer`` / ``Eva``, Hugging Face ViT / DeiT / CLIP / SigLIP / DINOv2, and their
            subclasses), or a vision-language model listed there (LLaVA, PaliGemma, Qwen2-VL, Qwen2.5-VL,
            InternVL, Gemma 3, Mistral 3, Idefics3, SmolVLM: the image tokens its language model reads are
            pruned in the vision tower, see :mod:`pruneattn.patch.vlm`); anything
            else raises TypeError naming its class (and why, where known).
        keep_rate: fraction of the patches each pruning block keeps (k = ceil(rate * P)), one number
            or one per entry of ``layers``; 1.0 keeps all (the block computes the same as unpatched).
            0.7 when neither ``keep_rate`` nor ``tokens`` is given.
        layers: 0-based indices of the pruning blocks; by default :func:`default_layers` of the
            model's depth (EViT's blocks 3, 6, 9 for 12 blocks: 1/4, 1/2 and 3/4 of the depth); for a
            vision-language model, the block whose output the model reads (also for the vision towers of
            Qwen3-VL, Qwen3.5 and GLM-4.xV alone: their last block, which their connector reads).
        stat, query: the score (``"var"`` / ``"mad"`` / ``"mean"``; ``"cls"`` / ``"mean"``, see docs/semantics.md).
            ``query`` defaults to ``"cls"`` for models with a class token and ``"mean"`` for the others
            (SigLIP, global-pooling ViTs without one); ``"cls"`` on a model without a class token raises.
        mode: ``"drop"`` or ``"fuse"`` (dropped patches averaged into one extra last token).
        tokens: keep exactly this many patches per image at each pruning block (one number or one per
            entry of ``layers``) instead of a keep rate; give either ``keep_rate`` or ``tokens``. For a
            vision-language model whose connector joins windows of patches into one token, windows per
            image or tile (the model's language-model tokens).
        score_hook: ``fn(layer, scores) -> scores``, called in each pruning block with the block's index
            and its patch scores (B, P) float32; the tensor it returns (same shape) is used for selection
            instead (e.g. random scores for a control experiment). The fuse weights are unchanged.

    Patching a patched model re-configures it (the previous patch is undone first). Returns ``model``.
    """
    options = Options(keep_rate, layers, stat, query, mode, tokens, score_hook)
    entry = registry.vision_language_of(model) if isinstance(model, nn.Module) else None
    if entry is not None:
        from pruneattn.patch import vlm

        return vlm.patch(model, entry, options)
    plan = plan_encoder(registry.describe(model), options)
    unpatch(model)
    plan.apply()
    return model


def image_tokens(model: nn.Module):
    """The frozen count of image tokens of a patched vision-language ``model``
    (:class:`pruneattn.patch.vlm.tokens.ImageTokens`): ``full(units)`` placeholders per image in the unpatched
    processor's prompt, ``kept(units)`` tokens its language model reads, ``planned(full)`` the same from the
    unpatched count; what ``patch_processor`` writes and what a serving engine plans with."""
    from pruneattn.patch.vlm.processor import model_plan

    return model_plan(model).tokens


def patch_processor(processor: object, model: nn.Module) -> object:
    """Make a Hugging Face ``processor`` insert, for each image, exactly the image tokens that the patched
    vision-language ``model``'s language model reads (k per image, from each image's size), in place; see
    :mod:`pruneattn.patch.vlm.processor`. ``pruneattn.unpatch(processor)`` restores it. Returns ``processor``."""
    from pruneattn.patch.vlm.processor import patch_processor as plan_processor

    return plan_processor(processor, model)


def unpatch(model: nn.Module | object) -> nn.Module | object:
    """Restore every module that ``patch`` changed under ``model`` (blocks, encoders, patch dropout) to
    its original class, in place; or a processor that ``patch_processor`` changed. Returns it."""
    if not isinstance(model, nn.Module):
        if is_swapped(model):  # a processor
            restore(model)
            model.__dict__.pop("_pruneattn_tokens", None)
            return model
        raise TypeError(
            f"pruneattn.unpatch expects a torch.nn.Module or a processor patched by pruneattn.patch_processor, "
            f"got {type(model).__name__}"
        )
    for m in model.modules():
        if is_swapped(m):
            restore(m)
        for handle in m.__dict__.pop("_pruneattn_hooks", ()):
            handle.remove()
        for name in [n for n in m.__dict__ if n.startswith("_pruneattn")]:
            del m.__dict__[name]
    return model


def _plans(model: nn.Module) -> dict[Plan, str]:
    """The patch plans under ``model`` and the name of the module that runs each."""
    found: dict[Plan, str] = {}
    for name, m in model.named_modules():
        plan = m.__dict__.get("_pruneattn_plan")
        if isinstance(plan, Plan) and plan not in found:
            found[plan] = name or type(m).__name__
    return found


def kept_indices(model: nn.Module) -> dict[int, torch.Tensor]:
    """``{block index: (B, k) int64}``: the patches kept by each pruning block in the last forward call
    of ``model`` that finished, as indices into the ORIGINAL patch grid (row-major, 0 = first patch after
    the prefix), ascending (in patch-dropout order where timm's patch dropout ran in train mode). Only the
    pruning blocks that call ran are listed (``forward_intermediates(stop_early=True)`` may stop before
    some). Composed on the device, no host sync. For a vision-language model the rows are its images, in
    batch order (``B`` is the number of images), indexing each image's own patch grid. For images of
    different sizes in one batch (padded or packed encoders) each row lists its image's kept patches
    first and is padded with -1 up to the batch's widest image. For a tower that merges units
    (Qwen2.5-VL's), the entries are the kept merged units, indices into each image's raster grid of units;
    for a vision-language model whose connector joins windows of patches (InternVL, Gemma 3, Mistral 3,
    Idefics3, SmolVLM), the patches of the kept windows (rows: the images or tiles the tower ran).

    Raises RuntimeError if no forward call has finished since patching, if the last one raised, or if
    the model was last traced by ``torch.export`` (an exported program leaves no indices behind);
    ValueError if ``model`` holds several patched models (e.g. a student and a teacher): call it on each.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"pruneattn.kept_indices expects a torch.nn.Module, got {type(model).__name__}")
    plans = _plans(model)
    if not plans:
        raise ValueError(f"kept_indices: this {type(model).__name__} is not patched (call pruneattn.patch first)")
    if len(plans) > 1:
        names = ", ".join(plans.values())
        raise ValueError(
            f"kept_indices: this {type(model).__name__} holds {len(plans)} patched models ({names}); "
            "call pruneattn.kept_indices on each of them"
        )
    state = next(iter(plans)).last.state
    if state is None:
        raise RuntimeError("kept_indices: run a forward pass of the patched model first")
    if isinstance(state, ForwardFailed):
        raise RuntimeError(
            "kept_indices: the last forward pass did not finish (it raised), so there are no indices of one "
            "whole forward; run a complete forward pass first"
        )
    if isinstance(state, Exported):
        raise RuntimeError(
            "kept_indices: the model was last traced by torch.export; the exported program does not record "
            "its kept indices. Run the patched model itself (eagerly or under torch.compile) to read them"
        )
    return composed_kept(state)
