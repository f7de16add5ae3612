"""Drop-in swap for real ViTs and vision-language models: ``patch`` / ``unpatch`` a timm or Hugging Face
model in place.

The chosen blocks get their class swapped to a pruning subclass (as ToMe does): no new parameters,
identical ``state_dict``. Each pruning block holds its frozen settings (``block._pruneattn``); the
model's encoder class is swapped too, so that every forward call keeps its kept indices in a state of
its own (:mod:`pruneattn.patch.state`). The supported families are listed in
:mod:`pruneattn.patch.registry`; :mod:`pruneattn.patch.prune` holds the pruning step; vision-language
models (the tower pruned, the prompt shortened to match) are :mod:`pruneattn.patch.vlm`.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pruneattn.patch import registry
from pruneattn.patch.positions import composed_kept
from pruneattn.patch.state import BlockConfig, Exported, ForwardFailed, Plan, ScoreHook
from pruneattn.patch.swap import is_swapped, original_class, restore, swap
from pruneattn.validate import MODES, QUERIES, STATS, check_choice, check_keep_rate, kept_of_rate

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


def default_full_attention_layers(depth: int, full: Sequence[int]) -> tuple[int, ...]:
    """The default pruning blocks of a tower that attends within windows except in its ``full`` blocks:
    for each of :func:`default_layers`, the nearest full-attention block (the earlier one on a tie),
    e.g. (7, 15, 23) for Qwen2.5-VL's 32 blocks with full attention in 7, 15, 23 and 31."""
    if not full:
        raise ValueError("this model has no full-attention block to prune in")
    return tuple(sorted({min(full, key=lambda f: (abs(f - i), f)) for i in default_layers(depth)}))


@dataclass(frozen=True)
class Amount:
    """How much one pruning block keeps: ``tokens`` patches if set, else ceil(keep_rate * P)."""

    keep_rate: float
    tokens: int | None = None

    @property
    def selects(self) -> bool:
        """Whether the block runs selection (keep rate 1.0 passes every token through)."""
        return self.tokens is not None or self.keep_rate < 1


def amounts(keep_rate: object, tokens: object, n: int) -> list[Amount]:
    """One checked :class:`Amount` per pruning block from ``patch``'s ``keep_rate`` / ``tokens``."""
    if keep_rate is not None and tokens is not None:
        raise ValueError("give either keep_rate or tokens, not both")
    if tokens is None:
        rates = _per_layer("keep_rate", 0.7 if keep_rate is None else keep_rate, n)
        for r in rates:
            check_keep_rate(r)
        return [Amount(float(r)) for r in rates]
    counts = _per_layer("tokens", tokens, n)
    for t in counts:
        if not _is_int(t):
            raise TypeError(f"tokens must be an int (patches kept per image) or one per layer, got {t!r}")
        if t < 1:
            raise ValueError(f"tokens must be >= 1 (patches kept per image), got {t}")
    return [Amount(1.0, int(t)) for t in counts]


def _per_layer(name: str, value: object, n: int) -> list:
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} must be a number or one per layer ({n}), got {len(values)} values")
    return values


def kept_after(num_patches: int, amounts_in_order: Sequence[Amount]) -> int:
    """Patches left after pruning blocks with these amounts, for an input of ``num_patches`` patches
    (ValueError where ``tokens`` exceeds what a block receives)."""
    for a in amounts_in_order:
        if a.tokens is not None:
            if a.tokens > num_patches:
                raise ValueError(
                    f"tokens={a.tokens} is more than the {num_patches} patches that pruning block receives"
                )
            num_patches = a.tokens
        elif a.selects:
            num_patches = kept_of_rate(num_patches, a.keep_rate)
    return num_patches


@dataclass(frozen=True)
class EncoderPatch:
    """A checked ``patch`` of one encoder, ready to apply (nothing has been changed yet)."""

    family: registry.Family
    encoder: nn.Module
    blocks: list
    layers: tuple[int, ...]  # ascending
    amounts: tuple[Amount, ...]  # one per layer
    shapes: dict
    stat: str
    query: str
    mode: str
    score_hook: ScoreHook | None

    def apply(self) -> Plan:
        """Swap the pruning blocks and attach the per-call state; returns the plan."""
        adapter = registry.adapter(self.family)
        num_prefix = registry.num_prefix(self.family, self.encoder)
        plan = Plan(self.layers)
        reader, fused = adapter.reader(self.family), False
        for layer, amount in zip(self.layers, self.amounts):
            block = self.blocks[layer]
            swap(block, adapter.pruned_block(self.shapes[layer], self.family))
            block._pruneattn = BlockConfig(
                layer, amount.keep_rate, self.stat, self.query, self.mode, num_prefix, fused_in=fused, plan=plan,
                shape=self.shapes[layer], reader=reader, score_hook=self.score_hook, tokens=amount.tokens,
                padded=self.family.padding is not None or self.family.packed is not None,
                unit=registry.unit_of(self.family, self.encoder),
            )
            fused = fused or (self.mode == "fuse" and amount.selects)
        adapter.attach(self.family, self.encoder, plan)
        return plan


def check_encoder(
    model: nn.Module,
    family: registry.Family,
    keep_rate: object,
    tokens: object,
    layers: object,
    stat: str,
    query: str | None,
    mode: str,
    score_hook: ScoreHook | None,
) -> EncoderPatch:
    """Check a ``patch`` of ``model`` (of ``family``) and return it ready to apply; raises before any change."""
    adapter = registry.adapter(family)
    encoder = adapter.encoder(family, model)
    blocks = registry.blocks_of(family, encoder)
    has_cls = family.class_token if family.class_token is not None else adapter.has_class_token(family, model)
    if query is None:
        query = "cls" if has_cls else "mean"
    check_choice("stat", stat, STATS)
    check_choice("query", query, QUERIES)
    check_choice("mode", mode, MODES)
    full = registry.full_attention_blocks(family, encoder)
    if layers is None and family.default_blocks is not None:
        layers = tuple(i % len(blocks) for i in family.default_blocks)
    elif layers is None:
        layers = default_layers(len(blocks)) if full is None else default_full_attention_layers(len(blocks), full)
    chosen = _layers(layers, len(blocks))
    per_layer = amounts(keep_rate, tokens, len(chosen))
    if full is not None:
        windowed = [i for i in chosen if i not in full]
        if windowed:
            raise ValueError(
                f"layers {windowed} of this {type(model).__name__} attend within windows, where a patch's score "
                f"would see its window only; prune in its full-attention blocks {list(full)}"
            )
    if mode == "fuse" and (family.packed is not None or family.merge_from is not None):
        raise ValueError(
            f"mode='fuse' is not available for {type(model).__name__}: its images are packed in one sequence, "
            "where a fused token per image would have no place between them; use mode='drop'"
        )
    if query == "cls" and not has_cls:
        raise ValueError(
            f"query='cls' needs a class token, which this {type(model).__name__} has not; use query='mean'"
        )
    if score_hook is not None and not callable(score_hook):
        raise TypeError(f"score_hook must be a callable fn(layer, scores) -> scores, got {type(score_hook).__name__}")
    shapes = {}
    for i in chosen:
        cls = original_class(blocks[i])
        shapes[i] = registry.shape_of(family, cls)
        if shapes[i] is None:
            names = ", ".join(s.block for s in family.blocks)
            raise TypeError(
                f"pruneattn.patch: block {i} is a {cls.__name__}; the {family.label} blocks pruneattn can "
                f"prune are: {names}"
            )
        adapter.check_block(family, blocks[i], shapes[i], i)
    order = sorted(range(len(chosen)), key=chosen.__getitem__)
    return EncoderPatch(
        family, encoder, blocks, tuple(chosen[j] for j in order), tuple(per_layer[j] for j in order), shapes,
        stat, query, mode, score_hook,
    )


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
            subclasses), or a vision-language model listed there (LLaVA, PaliGemma, Qwen2-VL, Qwen2.5-VL:
            the image tokens its language model reads are pruned in the vision tower, see
            :mod:`pruneattn.patch.vlm` and :mod:`pruneattn.patch.vlm_merged`); anything
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
            entry of ``layers``) instead of a keep rate; give either ``keep_rate`` or ``tokens``.
        score_hook: ``fn(layer, scores) -> scores``, called in each pruning block with the block's index
            and its patch scores (B, P) float32; the tensor it returns (same shape) is used for selection
            instead (e.g. random scores for a control experiment). The fuse weights are unchanged.

    Patching a patched model re-configures it (the previous patch is undone first). Returns ``model``.
    """
    if isinstance(model, nn.Module):
        vlm = registry.vision_language_of(model)
        if vlm is not None:
            from pruneattn.patch import vlm as vlm_patch

            return vlm_patch.patch(model, vlm, keep_rate, tokens, layers, stat, query, mode, score_hook)
    family = _family(model)
    checked = check_encoder(model, family, keep_rate, tokens, layers, stat, query, mode, score_hook)
    unpatch(model)
    checked.apply()
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
        for name in ("_pruneattn", "_pruneattn_plan", "_pruneattn_prompt", "_pruneattn_base", "_pruneattn_follow",
                     "_pruneattn_windowed"):
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
    some). Composed on the device, no host sync. For a vision-language model the rows are its images, in
    batch order (``B`` is the number of images), indexing each image's own patch grid. For images of
    different sizes in one batch (padded or packed encoders) each row lists its image's kept patches
    first and is padded with -1 up to the batch's widest image. For a tower that merges units
    (Qwen2.5-VL's), the entries are the kept merged units, indices into each image's raster grid of units.

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
