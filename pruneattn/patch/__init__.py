"""Drop-in swap for real ViTs: ``patch`` / ``unpatch`` a timm or Hugging Face model in place.

The chosen blocks get their class swapped to a pruning subclass (as ToMe does): no new parameters,
identical ``state_dict``. Each pruning block holds its frozen settings (``block._pruneattn``); the
model's encoder class is swapped too, so that every forward call keeps its kept indices in a state of
its own (:mod:`pruneattn.patch.state`). The supported families are listed in
:mod:`pruneattn.patch.registry`; :mod:`pruneattn.patch.prune` holds the pruning step.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import nn

from pruneattn.patch import registry
from pruneattn.patch.state import BlockConfig, Exported, ForwardFailed, Plan, ScoreHook
from pruneattn.patch.swap import is_swapped, original_class, restore, swap
from pruneattn.validate import MODES, QUERIES, STATS, check_choice, check_keep_rate

__all__ = ["default_layers", "kept_indices", "patch", "unpatch"]


def _family(model: object) -> registry.Family:
    """The registry entry that takes ``model``, or a TypeError naming the class and the reason."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"pruneattn.patch expects a torch.nn.Module, got {type(model).__name__}")
    reason = registry.refusal(model)
    if reason:
        raise TypeError(f"pruneattn.patch does not support {type(model).__name__}: {reason}")
    family = registry.family_of(model)
    if family is None:
        hint = ""
        if hasattr(model, "module") or hasattr(model, "_orig_mod"):
            hint = " (patch the model before wrapping it in DistributedDataParallel / torch.compile)"
        raise TypeError(
            f"pruneattn.patch does not support {type(model).__name__}{hint}; supported: {registry.supported_text()}"
        )
    return family


def _is_int(i: object) -> bool:
    return isinstance(i, numbers.Integral) and not isinstance(i, bool)


def _layers(layers: object, depth: int) -> list[int]:
    if _is_int(layers):
        layers = (layers,)
    if not isinstance(layers, Sequence) or isinstance(layers, str) or not all(_is_int(i) for i in layers):
        raise TypeError(f"layers must be a sequence of block indices (ints), got {layers!r}")
    out = [int(i) for i in layers]
    if not out:
        raise ValueError("layers must name at least one block")
    if any(not 0 <= i < depth for i in out):
        raise ValueError(f"layers must be block indices in [0, {depth}) for this {depth}-block model, got {out}")
    if len(set(out)) != len(out):
        raise ValueError(f"layers must not repeat a block, got {out}")
    return out


def default_layers(depth: int) -> tuple[int, ...]:
    """The default pruning blocks of a ``depth``-block model: EViT's positions, 1/4, 1/2 and 3/4 of
    the depth (0-based, rounded half up): (3, 6, 9) for 12 blocks, (6, 12, 18) for 24, (7, 14, 20)
    for 27. Shallower models get fewer distinct blocks (one block: block 0)."""
    if not _is_int(depth):
        raise TypeError(f"depth must be an int (the number of blocks), got {depth!r}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    return tuple(sorted({min(depth - 1, int(depth * f + 0.5)) for f in (0.25, 0.5, 0.75)}))


def _keep_rates(keep_rate: object, n: int) -> list[float]:
    rates = list(keep_rate) if isinstance(keep_rate, Sequence) and not isinstance(keep_rate, str) else [keep_rate] * n
    if len(rates) != n:
        raise ValueError(f"keep_rate must be a number or one per layer ({n}), got {len(rates)} values")
    for r in rates:
        check_keep_rate(r)
    return [float(r) for r in rates]


def patch(
    model: nn.Module,
    keep_rate: float | Sequence[float] = 0.7,
    layers: int | Sequence[int] | None = None,
    stat: str = "var",
    query: str | None = None,
    mode: str = "drop",
    score_hook: ScoreHook | None = None,
) -> nn.Module:
    """Make ``model`` prune patch tokens after the attention of the blocks in ``layers``, in place.

    Args:
        model: a model of one of the families in :mod:`pruneattn.patch.registry` (timm
            ``VisionTransformer`` / ``Eva``, Hugging Face ViT / DeiT / CLIP / SigLIP / DINOv2, and their
            subclasses); anything else raises TypeError naming its class (and why, where known).
        keep_rate: fraction of the patches each pruning block keeps (k = ceil(rate * P)), one number
            or one per entry of ``layers``; 1.0 keeps all (the block computes the same as unpatched).
        layers: 0-based indices of the pruning blocks; by default :func:`default_layers` of the
            model's depth (EViT's blocks 3, 6, 9 for 12 blocks: 1/4, 1/2 and 3/4 of the depth).
        stat, query: the score (``"var"`` / ``"mad"`` / ``"mean"``; ``"cls"`` / ``"mean"``, see docs/semantics.md).
            ``query`` defaults to ``"cls"`` for models with a class token and ``"mean"`` for the others
            (SigLIP, global-pooling ViTs without one); ``"cls"`` on a model without a class token raises.
        mode: ``"drop"`` or ``"fuse"`` (dropped patches averaged into one extra last token).
        score_hook: ``fn(layer, scores) -> scores``, called in each pruning block with the block's index
            and its patch scores (B, P) float32; the tensor it returns (same shape) is used for selection
            instead (e.g. random scores for a control experiment). The fuse weights are unchanged.

    Patching a patched model re-configures it (the previous patch is undone first). Returns ``model``.
    """
    family = _family(model)
    adapter = registry.adapter(family)
    encoder = adapter.encoder(family, model)
    blocks = registry.blocks_of(family, encoder)
    has_cls = family.class_token if family.class_token is not None else adapter.has_class_token(family, model)
    if query is None:
        query = "cls" if has_cls else "mean"
    check_choice("stat", stat, STATS)
    check_choice("query", query, QUERIES)
    check_choice("mode", mode, MODES)
    layers = _layers(default_layers(len(blocks)) if layers is None else layers, len(blocks))
    rates = _keep_rates(keep_rate, len(layers))
    if query == "cls" and not has_cls:
        raise ValueError(
            f"query='cls' needs a class token, which this {type(model).__name__} has not; use query='mean'"
        )
    if score_hook is not None and not callable(score_hook):
        raise TypeError(f"score_hook must be a callable fn(layer, scores) -> scores, got {type(score_hook).__name__}")
    shapes = {}
    for i in layers:
        cls = original_class(blocks[i])
        shapes[i] = registry.shape_of(family, cls)
        if shapes[i] is None:
            names = ", ".join(s.block for s in family.blocks)
            raise TypeError(
                f"pruneattn.patch: block {i} is a {cls.__name__}; the {family.label} blocks pruneattn can "
                f"prune are: {names}"
            )
        adapter.check_block(family, blocks[i], shapes[i], i)
    unpatch(model)
    num_prefix = registry.num_prefix(family, encoder)
    plan = Plan(tuple(sorted(layers)))
    reader, fused = adapter.reader(family), False
    for layer, rate in sorted(zip(layers, rates)):
        block = blocks[layer]
        swap(block, adapter.pruned_block(shapes[layer]))
        block._pruneattn = BlockConfig(
            layer, rate, stat, query, mode, num_prefix, fused_in=fused, plan=plan, shape=shapes[layer],
            reader=reader, score_hook=score_hook,
        )
        fused = fused or (mode == "fuse" and rate < 1)
    adapter.attach(family, encoder, plan)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore every module that ``patch`` changed under ``model`` (blocks, encoders, patch dropout) to
    its original class, in place. Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"pruneattn.unpatch expects a torch.nn.Module, got {type(model).__name__}")
    for m in model.modules():
        if is_swapped(m):
            restore(m)
        for handle in m.__dict__.pop("_pruneattn_hooks", ()):
            handle.remove()
        for name in ("_pruneattn", "_pruneattn_plan"):
            m.__dict__.pop(name, None)
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
    some). Composed on the device, no host sync.

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
    out: dict[int, torch.Tensor] = {}
    prev = state.origin
    for layer in sorted(state.kept):
        idx = state.kept[layer]
        out[layer] = prev = idx if prev is None else prev.gather(1, idx)
    return out
