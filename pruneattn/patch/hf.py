"""Hugging Face vision encoders (ViT, DeiT, CLIP, SigLIP, DINOv2 with and without registers), alone or
inside the models that hold them (``...ForImageClassification``, ``CLIPModel`` / ``SiglipModel``: the
vision side only).

The families are entries of :mod:`pruneattn.patch.registry`. Their layers compute q, k, v with separate
``q_proj`` / ``k_proj`` / ``v_proj`` Linears and attention through ``ALL_ATTENTION_FUNCTIONS`` (eager /
SDPA / flash); a patched layer runs the same projections and replaces only the attention function by
pruneattn's scoring attention, whatever ``_attn_implementation`` says. Hooks on the encoder make
each of its forward calls has its own pruning state. Hidden states recorded with
``output_hidden_states`` have the pruned token counts (see ``pruneattn.kept_indices`` for where the tokens
sit); ``output_attentions`` records None for patched layers (no attention matrix is formed), so the
tuple still has one entry per layer.

Padded encoders (SigLIP2 NaFlex, the Idefics3 / SmolVLM towers: images of different sizes in one
batch, their patches padded to one length and marked by a padding mask): the mask the caller passes
becomes the forward call's padding mask. Every layer is handed it as a broadcast (B, 1, 1, N) key mask
(nothing N x N), rebuilt after each pruning block for the tokens that remain, and so is the pooling
head; the pruning blocks score, select and pad per image (:func:`pruneattn.patch.prune.prune_padded`).
The ``attention_mask`` that ViT, DeiT, DINOv2, ViT-MSN, I-JEPA and ViT-MAE take (a key padding mask over
their tokens) is pruned under the same way; a mask that is not a key padding mask, or that hides a prefix
token, is refused before any work (:mod:`pruneattn.patch.masks`).

Packed encoders (Pixtral: the images of a batch in ONE sequence, a block-diagonal mask keeping them
apart): the unpatched layers run packed, as in the unpatched model; each pruning layer gets the
images unpacked into a padded batch (and their rotary tables per image), prunes each image on its own,
and the kept tokens are packed again, with their tables, for the layers after it.

Towers that merge units of patches (Qwen2-VL's, Qwen2.5-VL's with its window attention) are
:mod:`pruneattn.patch.windowed`.
"""
from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from pruneattn.ops import split_qkv
from pruneattn.patch.blocks import BlockShape, PrunedSequential
from pruneattn.patch.masks import caller_padding, key_mask, mask_like
from pruneattn.patch.packing import pack, unpack
from pruneattn.patch.positions import compose, gather_rows
from pruneattn.patch import registry, windowed
from pruneattn.patch.registry import Family, HFAttention, attribute, blocks_of
from pruneattn.patch.state import Plan, begin, current, end
from pruneattn.patch.swap import Swapped, swap

try:  # transformers 5.x collects output_attentions through this context variable
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - other transformers versions: nothing to keep aligned
    _active_collector = None


def _record_no_attention() -> None:
    """Add None to the attentions ``output_attentions`` collects, for a layer that forms no attention
    matrix. transformers fills that tuple from forward hooks on the attention modules and skips None
    outputs, and has no public way to add an entry; without this the entries of later layers would
    shift to the wrong index."""
    collected = None if _active_collector is None else _active_collector.get()
    if collected is not None and "attentions" in collected:
        collected["attentions"].append(None)


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rotate_patches(t: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotary embedding as Hugging Face's DINOv3 applies it: the last P tokens of ``t`` (B, H, N, d) are
    rotated by ``(cos, sin)``, (P, d) or per image (B, 1, P, d); the prefix tokens before them are not."""
    cos, sin = rope
    prefix, patches = t.split((t.shape[-2] - sin.shape[-2], sin.shape[-2]), dim=-2)
    return torch.cat((prefix, patches * cos + _rotate_half(patches) * sin), dim=-2).type_as(t)


class HFReader:
    """q, k, v of a Hugging Face attention module from its separate projections; its output projection."""

    def __init__(self, names: HFAttention) -> None:
        self.names = names

    def heads(self, att: nn.Module, x: torch.Tensor, rope: torch.Tensor | None):
        B, N, _ = x.shape
        if self.names.qkv is not None:
            q, k, v = split_qkv(getattr(att, self.names.qkv)(x), att.num_heads)
        else:
            q, k, v = att.q_proj(x), att.k_proj(x), att.v_proj(x)
            if self.names.qk_norm is not None:
                q, k = (getattr(att, n)(t) for n, t in zip(self.names.qk_norm, (q, k)))
            q, k, v = (t.view(B, N, -1, att.head_dim).transpose(1, 2) for t in (q, k, v))
        if rope is not None and self.names.rotary_float32:  # as the model rotates: in float32, whatever the dtype
            q, k = (rotate_patches(t.float(), rope).to(t.dtype) for t in (q, k))
        elif rope is not None:
            q, k = rotate_patches(q, rope), rotate_patches(k, rope)
        return q, k, v

    def scale(self, att: nn.Module) -> float:
        return float(getattr(att, self.names.scale))  # see TimmReader.scale

    def project(self, att: nn.Module, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        _record_no_attention()
        B, H, N, d = out.shape
        y = getattr(att, self.names.out)(out.transpose(1, 2).reshape(B, N, H * d))
        return y if self.names.out_dropout is None else getattr(att, self.names.out_dropout)(y)

    def dropout(self, att: nn.Module) -> float:
        return float(getattr(att, self.names.dropout))


# Models whose head averages every output token of their encoder, and the encoders found inside one.
_AVERAGE_TOKENS = frozenset({"Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification"})
_AVERAGED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class CallerMask:
    """Where an encoder's forward takes an attention mask over its tokens, its prefix tokens, and the model
    around it whose head averages all its output tokens (if any) while some layer prunes."""

    position: int | None  # index among the positional arguments after ``self``; None: keyword only, or none
    num_prefix: int
    averaged_by: str | None = None

    @staticmethod
    def of(encoder: nn.Module, num_prefix: int, selects: bool) -> CallerMask:
        names = list(inspect.signature(type(encoder).forward).parameters)[1:]
        position = names.index("attention_mask") if "attention_mask" in names else None
        return CallerMask(position, num_prefix, _AVERAGED.get(encoder) if selects else None)

    def find(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        if self.position is not None and len(args) > self.position:
            return args[self.position]
        return kwargs.get("attention_mask")


def _begin_call(mask: CallerMask, encoder: nn.Module, args: tuple, kwargs: dict) -> None:
    """Open an encoder's call. An attention mask its caller passes (ViT, DeiT, DINOv2 and others take a
    key padding mask over their tokens) is checked here, before any work: the layers then prune under it."""
    given = mask.find(args, kwargs)
    real = caller_padding(given, mask.num_prefix, type(encoder).__name__)
    if real is not None and mask.averaged_by is not None:
        patches = real[:, mask.num_prefix :].sum(dim=1)
        if bool((patches != patches[0]).any()):
            raise ValueError(
                f"pruneattn: {mask.averaged_by} averages every output token of its {type(encoder).__name__}, but "
                "under this attention_mask its images keep different numbers of patches, so the average would "
                f"include padding slots; patch its {type(encoder).__name__} on its own and pool each image's kept "
                "tokens (pruneattn.kept_indices), or patch with keep_rate=1.0"
            )
    state = begin(encoder._pruneattn_plan)
    state.caller_mask = given is not None


def _begin_padded_call(encoder: nn.Module, args: tuple, kwargs: dict) -> None:
    """Open a padded encoder's call. Until its first pruning layer the layers get the attention mask the
    encoder builds from its padding mask, as unpatched; from there on, the call's own (B, N) mask."""
    begin(encoder._pruneattn_plan).caller_mask = True


class TakesCallMask(Swapped):
    """Swapped into every layer of a Hugging Face encoder. Until a pruning layer has pruned under a padding
    mask, a layer gets the attention mask the encoder built, as unpatched (none where the caller passed
    none: the mask transformers builds for all tokens while it believes it is exporting, as under torch
    2.11's ``torch.compile``, lets every token see every token). From there on it gets the running call's
    padding mask of the tokens it receives, in the form the encoder built: a (B, N) mask, a boolean view
    (B, 1, 1, N), or an additive (B, 1, 1, N) key mask (0 / lowest). Replaced in ``__call__``, before
    transformers' activation checkpointing wraps the forward, so that a recompute gets the same mask."""

    keeps_name = True

    def __call__(self, hidden_states, *args, **kwargs):
        state = current(self._pruneattn_plan)
        given = args[0] if args else kwargs.get("attention_mask")
        if state is None or (state.valid is None and (state.caller_mask or given is None)):
            return super().__call__(hidden_states, *args, **kwargs)
        mask = None if state.valid is None else mask_like(state.valid, given, hidden_states.dtype)
        if args:
            args = (mask, *args[1:])
        else:
            kwargs["attention_mask"] = mask
        return super().__call__(hidden_states, *args, **kwargs)


class PrunedLayer(TakesCallMask, PrunedSequential):
    """A pruning layer of a Hugging Face encoder: the attention mask it is given, if any, is a padding
    mask, and it prunes per image under it."""

    keeps_name = False
    takes_padding = True


def _begin_packed_call(encoder: nn.Module, args: tuple, kwargs: dict) -> None:
    """Open a packed encoder's call: the number of patches of each image (from ``image_sizes``, the
    second argument, or the batch's image size) is what the packed layers unpack by."""
    state = begin(encoder._pruneattn_plan)
    pixels = args[0] if args else kwargs["pixel_values"]
    sizes = args[1] if len(args) > 1 else kwargs.get("image_sizes")
    if sizes is None:
        sizes = [tuple(pixels.shape[-2:])] * pixels.shape[0]
    elif isinstance(sizes, torch.Tensor):
        sizes = sizes.tolist()
    p = encoder.patch_size
    state.grids = [(int(h) // p, int(w) // p) for h, w in sizes]
    state.lengths = [h * w for h, w in state.grids]


class PacksPerImage(Swapped):
    """Swapped into the module that runs a packed encoder's layers (Pixtral's ``transformer``)."""

    keeps_name = True

    def forward(self, inputs_embeds, attention_mask=None, position_embeddings=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        state = current(self._pruneattn_plan)
        if state is None or state.lengths is None or inputs_embeds.shape[0] != 1:
            raise TypeError(
                f"pruneattn: the layers of a patched {type(self).__name__} prune each image of the packed sequence, "
                "which needs the images' sizes: call the vision model itself (with image_sizes), not its "
                "transformer alone"
            )
        lengths = state.lengths
        x, (cos, sin) = inputs_embeds[0], position_embeddings
        for i, layer in enumerate(self.layers):
            if getattr(layer, "_pruneattn", None) is None:  # as in the unpatched model: packed, block mask
                x = layer(x[None], attention_mask, position_embeddings=(cos, sin), **kwargs)[0]
                continue
            xp, valid = unpack(x, lengths)
            (cp, _), (sp, _) = unpack(cos, lengths), unpack(sin, lengths)
            state.valid = valid
            y = layer(xp, key_mask(valid, xp.dtype), position_embeddings=(cp[:, None], sp[:, None]), **kwargs)
            kept, valid = state.kept[i], state.valid
            index = kept.clamp(min=0)[:, :, None].expand(-1, -1, cp.shape[-1])
            cos, sin = pack(cp.gather(1, index), valid), pack(sp.gather(1, index), valid)
            x, lengths = pack(y, valid), valid.sum(dim=1).tolist()
            if attention_mask is not None:
                attention_mask = _block_mask(lengths, x)
            elif "cu_seq_lens_q" in kwargs:  # flash attention: the images' boundaries, as the model passes them
                bounds = torch.tensor([0, *lengths], device=x.device, dtype=torch.int32).cumsum(dim=0, dtype=torch.int32)
                kwargs.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=max(lengths),
                              max_length_k=max(lengths))
        state.valid = None
        return BaseModelOutputWithPooling(last_hidden_state=x[None])


def _block_mask(lengths: list[int], x: torch.Tensor) -> torch.Tensor:
    """Pixtral's own block-diagonal mask of images packed with these lengths (what its model builds)."""
    from transformers.models.pixtral.modeling_pixtral import generate_block_attention_mask

    return generate_block_attention_mask(lengths, x[None])


def _pool_mask(head: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of a padded encoder's pooling head: it pools the tokens that remain, so it gets
    their padding mask instead of the input's. Where the layers got no padding mask (every token of the
    batch real: transformers passes none), every remaining token is real too."""
    state = current(head._pruneattn_plan)
    mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
    if state is None or mask is None:
        return None
    tokens = args[0] if args else kwargs["hidden_state"]
    valid = state.valid if state.valid is not None else mask.new_ones(tokens.shape[:2])
    valid = valid.to(mask.dtype)
    if len(args) > 1:
        return (args[0], valid, *args[2:]), kwargs
    return args, {**kwargs, "attention_mask": valid}


def _masked_patches(embeddings: nn.Module, args: tuple, output: object) -> None:
    """ViT-MAE's embeddings return (tokens, mask, ids_restore) after dropping patches at random: the
    patches they kept, in order, are where the later kept indices point (so those index the full grid)."""
    state = current(embeddings._pruneattn_plan)
    if state is not None and isinstance(output, tuple) and len(output) == 3:
        tokens, _, restore = output
        state.origin = restore.argsort(dim=1)[:, : tokens.shape[1] - 1]


def _end_call(encoder: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
    state = current(encoder._pruneattn_plan)
    if state is not None:
        end(state, output is not None)


@dataclass(frozen=True)
class Follow:
    """What a block after a pruning block needs to rotate its tokens by their original grid positions."""

    plan: Plan
    earlier: tuple[int, ...]  # the pruning blocks before it
    fused: bool  # its input ends with a fused token


class FollowsKeptPatches(TakesCallMask):
    """Swapped into every block of a rotary family after the first pruning block: its ``(cos, sin)``
    tables are gathered per image at the original grid positions of the tokens it receives (the fused
    token, if any, gets the identity rotation). This happens in ``__call__``, before transformers'
    activation checkpointing wraps the forward, so that a recompute reuses the gathered tables."""

    keeps_name = True
    _pruneattn_follow: Follow

    def __call__(self, *args, **kwargs):
        follow = self._pruneattn_follow
        state = current(follow.plan)
        tables = kwargs.get("position_embeddings")
        if state is not None and tables is not None:
            pos = None
            for layer in follow.earlier:
                if layer in state.kept:
                    pos = compose(pos, state.kept[layer])
            cos, sin = tables
            fused = follow.fused
            kwargs["position_embeddings"] = (gather_rows(cos, pos, 1.0 if fused else None),
                                             gather_rows(sin, pos, 0.0 if fused else None))
        return super().__call__(*args, **kwargs)


class PrunedFollowing(FollowsKeptPatches, PrunedSequential):
    """A pruning block after another pruning block in a rotary family."""

    keeps_name = False
    takes_padding = True


def _follow_kept_patches(family: Family, encoder: nn.Module, plan: Plan) -> None:
    blocks = blocks_of(family, encoder)
    fused = False
    for i, block in enumerate(blocks):
        if i > plan.layers[0]:
            swap(block, PrunedFollowing if i in plan.layers else FollowsKeptPatches)
            block._pruneattn_follow = Follow(plan, tuple(l for l in plan.layers if l < i), fused)
        cfg = getattr(block, "_pruneattn", None)
        fused = fused or (cfg is not None and cfg.mode == "fuse" and cfg.selects)


class HFAdapter:
    """The :class:`pruneattn.patch.registry.Adapter` of the Hugging Face families."""

    def encoder(self, family: Family, model: nn.Module) -> nn.Module:
        found = [m for m in model.modules() if type(m).__name__ in family.encoder]
        if len(found) != 1:
            raise TypeError(
                f"pruneattn.patch: expected one vision encoder ({' / '.join(family.encoder)}) in this "
                f"{type(model).__name__}, found {len(found)}"
            )
        averaging = next((c.__name__ for c in type(model).__mro__ if c.__name__ in _AVERAGE_TOKENS), None)
        if averaging is None:
            _AVERAGED.pop(found[0], None)
        else:
            _AVERAGED[found[0]] = averaging
        return found[0]

    def has_class_token(self, family: Family, model: nn.Module) -> bool:
        return bool(family.class_token)

    def reader(self, family: Family) -> HFReader:
        return HFReader(family.attention)

    def pruned_block(self, shape: BlockShape, family: Family) -> type:
        if family.merge_from is not None:
            return windowed.PrunedWindowed
        return PrunedLayer

    def attach(self, family: Family, encoder: nn.Module, plan: Plan) -> None:
        """Forward hooks open and close each call's state: swapping the class of a transformers model
        would change the class name that transformers keys its output recording (and saved configs) on."""
        if family.merge_from is not None:
            windowed.attach(family, encoder, plan, registry.unit_of(family, encoder))
            return
        encoder._pruneattn_plan = plan
        if family.padding is None:
            selects = any(getattr(b, "_pruneattn", None) is not None and b._pruneattn.selects
                          for b in blocks_of(family, encoder))
            begin_call = partial(_begin_call, CallerMask.of(encoder, registry.num_prefix(family, encoder), selects))
        else:
            begin_call = _begin_padded_call
        if family.packed is not None:
            begin_call = _begin_packed_call
            runner = attribute(encoder, family.packed)
            swap(runner, PacksPerImage)
            runner._pruneattn_plan = plan
        encoder._pruneattn_hooks = (
            encoder.register_forward_pre_hook(begin_call, with_kwargs=True),
            encoder.register_forward_hook(_end_call, with_kwargs=True, always_call=True),
        )
        for block in blocks_of(family, encoder):  # the later unpatched layers too: they see fewer tokens
            block._pruneattn_plan = plan
            # Packed: the runner gives the masks. Pruning layers (a spatial-unit one too) take the call's mask already.
            if family.packed is None and not isinstance(block, TakesCallMask):
                swap(block, TakesCallMask)
        if family.pool_mask is not None:
            head = attribute(encoder, family.pool_mask)
            if head is not None:
                head._pruneattn_plan = plan
                head._pruneattn_hooks = (head.register_forward_pre_hook(_pool_mask, with_kwargs=True),)
        if family.rotary:
            _follow_kept_patches(family, encoder, plan)
        if family.masking is not None:
            embeddings = attribute(encoder, family.masking)
            embeddings._pruneattn_plan = plan
            embeddings._pruneattn_hooks = (embeddings.register_forward_hook(_masked_patches),)

    def check_block(self, family: Family, block: nn.Module, shape: BlockShape, layer: int) -> None:
        att = getattr(block, shape.attention.module)
        p = self.reader(family).dropout(att)
        if p > 0 and family.merge_from is not None:
            raise ValueError(
                f"pruneattn.patch: layer {layer} uses attention dropout (p={p}), which the pruning layers of a "
                f"{family.label} tower do not apply; set the config's attention dropout to 0 first"
            )


ADAPTER = HFAdapter()
