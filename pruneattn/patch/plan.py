"""From a model and a ``patch`` call's options to one checked, frozen plan, then applied in one step.

:func:`plan_encoder` checks every option against the model the registry described
(:func:`pruneattn.patch.registry.describe`) and raises before anything is changed; :meth:`EncoderPlan.apply`
swaps the pruning blocks and attaches the per-call state.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pruneattn.patch.blocks import BlockShape
from pruneattn.patch.options import Amount, Options, amounts, is_int
from pruneattn.patch.registry import Encoder, shape_of
from pruneattn.patch.state import BlockConfig, Plan, ScoreHook
from pruneattn.patch.swap import original_class, swap
from pruneattn.validate import MODES, QUERIES, STATS, check_choice


def default_layers(depth: int) -> tuple[int, ...]:
    """The default pruning blocks of a ``depth``-block model: EViT's positions, 1/4, 1/2 and 3/4 of
    the depth (0-based, rounded half up): (3, 6, 9) for 12 blocks, (6, 12, 18) for 24, (7, 14, 20)
    for 27. Shallower models get fewer distinct blocks (one block: block 0)."""
    if not is_int(depth):
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


def _layers(layers: object, depth: int) -> list[int]:
    if is_int(layers):
        layers = (layers,)
    if not isinstance(layers, Sequence) or isinstance(layers, str) or not all(is_int(i) for i in layers):
        raise TypeError(f"layers must be a sequence of block indices (ints), got {layers!r}")
    out = [int(i) for i in layers]
    if not out:
        raise ValueError("layers must name at least one block")
    if any(not 0 <= i < depth for i in out):
        raise ValueError(f"layers must be block indices in [0, {depth}) for this {depth}-block model, got {out}")
    if len(set(out)) != len(out):
        raise ValueError(f"layers must not repeat a block, got {out}")
    return out


@dataclass(frozen=True, eq=False)
class EncoderPlan:
    """A checked ``patch`` of one encoder, ready to apply (nothing has been changed yet)."""

    encoder: Encoder
    layers: tuple[int, ...]  # ascending
    amounts: tuple[Amount, ...]  # one per layer
    shapes: tuple[BlockShape, ...]  # one per layer
    stat: str
    query: str
    mode: str
    score_hook: ScoreHook | None

    @property
    def fused(self) -> bool:
        """Whether the blocks' output ends with a fused token."""
        return self.mode == "fuse" and any(a.selects for a in self.amounts)

    def apply(self) -> Plan:
        """Swap the pruning blocks and attach the per-call state; returns the plan."""
        e = self.encoder
        family = e.family
        plan = Plan(self.layers)
        reader, fused = e.adapter.reader(family), False
        for layer, amount, shape in zip(self.layers, self.amounts, self.shapes):
            block = e.blocks[layer]
            mixin = e.adapter.pruned_block(shape, family)
            if e.unit > 1 and family.merge_from is None:  # the model's connector joins m x m windows
                from pruneattn.patch import units

                mixin = units.pruned_block(mixin)
            swap(block, mixin)
            block._pruneattn = BlockConfig(
                layer, amount.keep_rate, self.stat, self.query, self.mode, e.num_prefix, fused_in=fused, plan=plan,
                shape=shape, reader=reader, score_hook=self.score_hook, tokens=amount.tokens,
                padded=family.padding is not None or family.packed is not None, unit=e.unit,
            )
            fused = fused or (self.mode == "fuse" and amount.selects)
        e.adapter.attach(family, e.encoder, plan)
        return plan


def plan_encoder(encoder: Encoder, options: Options) -> EncoderPlan:
    """Check ``options`` against ``encoder`` and return the plan; raises before any change."""
    family, model = encoder.family, encoder.model
    query = options.query
    if query is None:
        query = "cls" if encoder.class_token else "mean"
    check_choice("stat", options.stat, STATS)
    check_choice("query", query, QUERIES)
    check_choice("mode", options.mode, MODES)
    depth, full = len(encoder.blocks), encoder.full_attention
    if full is not None and not any(0 <= f < depth for f in full):
        raise ValueError(
            f"pruneattn.patch: this {type(model).__name__} has no full-attention block among its {depth} blocks (its "
            f"full-attention blocks are {list(full)}): every block attends within windows, where a patch's score "
            "would see its window only, so pruneattn has no block to prune in"
        )
    layers = options.layers
    if layers is None and family.default_blocks is not None:
        layers = tuple(i % depth for i in family.default_blocks)
    elif layers is None:
        layers = default_layers(depth) if full is None else default_full_attention_layers(depth, full)
    chosen = _layers(layers, depth)
    per_layer = amounts(options.keep_rate, options.tokens, len(chosen))
    if full is not None:
        windowed = [i for i in chosen if i not in full]
        if windowed:
            raise ValueError(
                f"layers {windowed} of this {type(model).__name__} attend within windows, where a patch's score "
                f"would see its window only; prune in its full-attention blocks {list(full)}"
            )
    if options.mode == "fuse" and (family.packed is not None or family.merge_from is not None):
        raise ValueError(
            f"mode='fuse' is not available for {type(model).__name__}: its images are packed in one sequence, "
            "where a fused token per image would have no place between them; use mode='drop'"
        )
    if query == "cls" and not encoder.class_token:
        raise ValueError(
            f"query='cls' needs a class token, which this {type(model).__name__} has not; use query='mean'"
        )
    hook = options.score_hook
    if hook is not None and not callable(hook):
        raise TypeError(f"score_hook must be a callable fn(layer, scores) -> scores, got {type(hook).__name__}")
    shapes = {}
    for i in chosen:
        cls = original_class(encoder.blocks[i])
        shapes[i] = shape_of(family, cls)
        if shapes[i] is None:
            names = ", ".join(s.block for s in family.blocks)
            raise TypeError(
                f"pruneattn.patch: block {i} is a {cls.__name__}; the {family.label} blocks pruneattn can "
                f"prune are: {names}"
            )
        encoder.adapter.check_block(family, encoder.blocks[i], shapes[i], i)
    order = sorted(range(len(chosen)), key=chosen.__getitem__)
    return EncoderPlan(
        encoder, tuple(chosen[j] for j in order), tuple(per_layer[j] for j in order),
        tuple(shapes[chosen[j]] for j in order), options.stat, query, options.mode, hook,
    )
