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
"""
from __future__ import annotations

import torch
from torch import nn

from pruneattn.patch.blocks import BlockShape, PrunedSequential
from pruneattn.patch.registry import Family, HFAttention, blocks_of
from pruneattn.patch.state import Plan, begin, current, end

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


class HFReader:
    """q, k, v of a Hugging Face attention module from its separate projections; its output projection."""

    def __init__(self, names: HFAttention) -> None:
        self.names = names

    def heads(self, att: nn.Module, x: torch.Tensor, rope: torch.Tensor | None):
        B, N, _ = x.shape
        return tuple(p(x).view(B, N, -1, att.head_dim).transpose(1, 2) for p in (att.q_proj, att.k_proj, att.v_proj))

    def scale(self, att: nn.Module) -> float:
        return float(getattr(att, self.names.scale))  # see TimmReader.scale

    def project(self, att: nn.Module, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        _record_no_attention()
        B, H, N, d = out.shape
        return getattr(att, self.names.out)(out.transpose(1, 2).reshape(B, N, H * d))

    def dropout(self, att: nn.Module) -> float:
        return float(getattr(att, self.names.dropout))


# One entry per running call of a patched encoder (innermost last): whether its caller passed an
# attention mask. A list, not a context variable: torch.compile traces list updates, not ContextVar.set.
_CALLER_MASK: list[bool] = []


def _begin_call(encoder: nn.Module, args: tuple, kwargs: dict) -> None:
    # Anything positional after pixel_values may be a mask: counted as one.
    _CALLER_MASK.append(len(args) > 1 or kwargs.get("attention_mask") is not None)
    begin(encoder._pruneattn_plan)


def _end_call(encoder: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
    if _CALLER_MASK:
        _CALLER_MASK.pop()
    state = current(encoder._pruneattn_plan)
    if state is not None:
        end(state, output is not None)


def _drop_own_mask(layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of each layer of a patched encoder: when the encoder's caller passed no attention
    mask, the mask the encoder built itself lets every token see every token, so the layer gets None
    instead (transformers builds that mask, for all tokens, rather than None while it believes it is
    exporting, as under torch 2.11's ``torch.compile``). A mask the caller passed reaches the layers,
    and the patched ones refuse it."""
    if not _CALLER_MASK or _CALLER_MASK[-1]:
        return None
    if len(args) > 1 and args[1] is not None:
        args = (args[0], None, *args[2:])
    if kwargs.get("attention_mask") is not None:
        kwargs = {**kwargs, "attention_mask": None}
    return args, kwargs


class HFAdapter:
    """The :class:`pruneattn.patch.registry.Adapter` of the Hugging Face families."""

    def encoder(self, family: Family, model: nn.Module) -> nn.Module:
        found = [m for m in model.modules() if type(m).__name__ in family.encoder]
        if len(found) != 1:
            raise TypeError(
                f"pruneattn.patch: expected one vision encoder ({' / '.join(family.encoder)}) in this "
                f"{type(model).__name__}, found {len(found)}"
            )
        return found[0]

    def has_class_token(self, family: Family, model: nn.Module) -> bool:
        return bool(family.class_token)

    def reader(self, family: Family) -> HFReader:
        return HFReader(family.attention)

    def pruned_block(self, shape: BlockShape) -> type:
        return PrunedSequential

    def attach(self, family: Family, encoder: nn.Module, plan: Plan) -> None:
        """Forward hooks open and close each call's state: swapping the class of a transformers model
        would change the class name that transformers keys its output recording (and saved configs) on."""
        encoder._pruneattn_plan = plan
        encoder._pruneattn_hooks = (
            encoder.register_forward_pre_hook(_begin_call, with_kwargs=True),
            encoder.register_forward_hook(_end_call, with_kwargs=True, always_call=True),
        )
        for block in blocks_of(family, encoder):  # the later unpatched layers too: they see fewer tokens
            block._pruneattn_hooks = (block.register_forward_pre_hook(_drop_own_mask, with_kwargs=True),)

    def check_block(self, family: Family, block: nn.Module, shape: BlockShape, layer: int) -> None:
        att = getattr(block, shape.attention.module)
        p = self.reader(family).dropout(att)
        if p > 0:
            raise ValueError(
                f"pruneattn.patch: layer {layer} uses attention dropout (p={p}), which the fused attention cannot "
                "apply; set the config's attention dropout to 0 first"
            )


ADAPTER = HFAdapter()
