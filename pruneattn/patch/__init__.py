"""Drop-in swap for real ViTs: ``patch`` / ``unpatch`` a timm or Hugging Face model in place.

The chosen blocks get their ``__class__`` swapped to a pruning subclass (as ToMe does): no new
parameters, identical ``state_dict``; the configuration lives in ``block._pruneattn``. See
:mod:`pruneattn.patch.prune` for the pruning step and the fused-token rule.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import nn

from pruneattn.patch.prune import PruneConfig, compose_indices, make_configs
from pruneattn.validate import MODES, QUERIES, STATS, check_choice, check_keep_rate

__all__ = ["default_layers", "kept_indices", "patch", "unpatch"]

SUPPORTED = "; ".join(
    (
        "timm VisionTransformer (vit_*, deit_* incl. distilled, registers, avg pooling, parallel and post-norm "
        "blocks) and Eva (eva02_*, vit_*_rope*, vit_*_dinov3)",
        "transformers ViT, DeiT, CLIP and SigLIP vision encoders, DINOv2 (with registers)",
    )
)


def _adapter(model: object) -> ModuleType:
    """The module that knows ``model``'s library, or a TypeError naming the class."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"pruneattn.patch expects a torch.nn.Module, got {type(model).__name__}")
    libraries = {cls.__module__.split(".")[0] for cls in type(model).__mro__}
    if "timm" in libraries:
        from pruneattn.patch import timm as adapter
    elif "transformers" in libraries:
        from pruneattn.patch import hf as adapter
    else:
        adapter = None
    reason = adapter.unsupported_reason(model) if adapter is not None else None
    if reason:
        raise TypeError(f"pruneattn.patch does not support {type(model).__name__}: {reason}")
    if adapter is None or not adapter.supports(model):
        hint = ""
        if hasattr(model, "module") or hasattr(model, "_orig_mod"):
            hint = " (patch the model before wrapping it in DistributedDataParallel / torch.compile)"
        raise TypeError(f"pruneattn.patch does not support {type(model).__name__}{hint}; supported: {SUPPORTED}")
    return adapter


def _layers(layers: object, depth: int) -> list[int]:
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        layers = (layers,)
    if not isinstance(layers, Sequence) or not all(
        isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in layers
    ):
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
    return tuple(sorted({min(depth - 1, int(depth * f + 0.5)) for f in (0.25, 0.5, 0.75)}))


def _keep_rates(keep_rate: object, n: int) -> list[float]:
    rates = list(keep_rate) if isinstance(keep_rate, Sequence) and not isinstance(keep_rate, str) else [keep_rate] * n
    if len(rates) != n:
        raise ValueError(f"keep_rate must be a number or one per layer ({n}), got {len(rates)} values")
    for r in rates:
        check_keep_rate(r)
    return [float(r) for r in rates]


def _patched(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "_pruneattn", None), PruneConfig)]


def patch(
    model: nn.Module,
    keep_rate: float | Sequence[float] = 0.7,
    layers: int | Sequence[int] | None = None,
    stat: str = "var",
    query: str | None = None,
    mode: str = "drop",
) -> nn.Module:
    """Make ``model`` prune patch tokens after the attention of the blocks in ``layers``, in place.

    Args:
        model: a timm ``VisionTransformer`` (or subclass, e.g. distilled DeiT) or a Hugging Face
            ViT / DeiT model (see ``SUPPORTED``); anything else raises TypeError naming its class.
        keep_rate: fraction of the patches each pruning block keeps (k = ceil(rate * P)), one number
            or one per entry of ``layers``; 1.0 keeps all (the block computes the same as unpatched).
        layers: 0-based indices of the pruning blocks; by default :func:`default_layers` of the
            model's depth (EViT's blocks 3, 6, 9 for 12 blocks: 1/4, 1/2 and 3/4 of the depth).
        stat, query: the score (``"var"`` / ``"mad"`` / ``"mean"``; ``"cls"`` / ``"mean"``, see docs/semantics.md).
            ``query`` defaults to ``"cls"`` for models with a class token and ``"mean"`` for the others
            (SigLIP, global-pooling ViTs without one); ``"cls"`` on a model without a class token raises.
        mode: ``"drop"`` or ``"fuse"`` (dropped patches averaged into one extra last token).

    Patching a patched model re-configures it (the previous patch is undone first). Returns ``model``.
    """
    adapter = _adapter(model)
    if query is None:
        query = "cls" if adapter.has_class_token(model) else "mean"
    check_choice("stat", stat, STATS)
    check_choice("query", query, QUERIES)
    check_choice("mode", mode, MODES)
    blocks = adapter.blocks(model)
    layers = _layers(default_layers(len(blocks)) if layers is None else layers, len(blocks))
    rates = _keep_rates(keep_rate, len(layers))
    if query == "cls" and not adapter.has_class_token(model):
        raise ValueError(
            f"query='cls' needs a class token, which this {type(model).__name__} has not; use query='mean'"
        )
    for i in layers:
        adapter.check_block(blocks[i], i)
    unpatch(model)
    configs = make_configs(layers, rates, stat=stat, query=query, mode=mode, num_prefix=adapter.num_prefix(model))
    for cfg in configs:
        block = blocks[cfg.layer]
        cfg.orig_class = type(block)
        block._pruneattn = cfg
        block.__class__ = adapter.PRUNED_CLASSES[cfg.orig_class]
    model_class = getattr(adapter, "model_class", None)
    if model_class is not None:  # the model's own loop follows the kept patches (rotary tables, grids)
        model._pruneattn_class = type(model)
        model.__class__ = model_class(type(model))
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore every patched block of ``model`` to its original class, in place. Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"pruneattn.unpatch expects a torch.nn.Module, got {type(model).__name__}")
    for block in _patched(model):
        block.__class__ = block._pruneattn.orig_class
        del block._pruneattn
    orig = model.__dict__.pop("_pruneattn_class", None)
    if orig is not None:
        model.__class__ = orig
    return model


def kept_indices(model: nn.Module) -> dict[int, torch.Tensor]:
    """``{block index: (B, k) int64}``: the patches kept by each pruning block in the last forward
    pass, as indices into the ORIGINAL patch grid (row-major, 0 = first patch after the prefix),
    ascending. Composed on the device, no host sync. Raises RuntimeError if the last forward pass
    did not run every pruning block (it raised, or stopped early), rather than mixing two forwards."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"pruneattn.kept_indices expects a torch.nn.Module, got {type(model).__name__}")
    configs = [m._pruneattn for m in _patched(model)]
    if not configs:
        raise ValueError(f"kept_indices: this {type(model).__name__} is not patched (call pruneattn.patch first)")
    return compose_indices(configs)
