"""Hugging Face vision encoders: ViT, DeiT, CLIP, SigLIP and DINOv2 (with registers), alone or inside the
models that hold them (``...ForImageClassification``, ``CLIPModel`` / ``SiglipModel``: the vision side only).

Their layers compute q, k, v with separate ``q_proj`` / ``k_proj`` / ``v_proj`` Linears and attention
through ``ALL_ATTENTION_FUNCTIONS`` (eager / SDPA / flash). A patched layer runs the same projections and
replaces only the attention function by pruneattn's scoring attention, whatever
``_attn_implementation`` says; selection sits after the attention residual (after DINOv2's layer
scale). Hidden states recorded with ``output_hidden_states`` have the pruned token counts (see
``pruneattn.kept_indices`` for where the tokens sit); ``output_attentions`` records nothing for patched
layers (no attention matrix is formed). SigLIP has no class token: ``query="mean"`` by default, and its
attention-pooling head pools the kept (and fused) tokens. CLIP's ``pre_layrnorm`` / ``post_layernorm``
are untouched.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPVisionModel
from transformers.models.deit.modeling_deit import DeiTLayer, DeiTModel
from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer, Dinov2Model
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
    Dinov2WithRegistersLayer,
    Dinov2WithRegistersModel,
)
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer, SiglipVisionModel
from transformers.models.vit.modeling_vit import ViTLayer, ViTModel

from pruneattn.patch.prune import PruneConfig, attention, prune_tokens

SUPPORTED = (
    "ViTModel",
    "ViTForImageClassification",
    "DeiTModel",
    "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "CLIPModel",
    "SiglipVisionModel",
    "SiglipModel",
    "SiglipForImageClassification",
    "Dinov2Model",
    "Dinov2ForImageClassification",
    "Dinov2WithRegistersModel",
    "Dinov2WithRegistersForImageClassification",
)
_ENCODERS = (ViTModel, DeiTModel, CLIPVisionModel, SiglipVisionModel, Dinov2Model, Dinov2WithRegistersModel)


def _heads(att: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, N, d) from the attention module's separate projections."""
    B, N, _ = x.shape
    return tuple(p(x).view(B, N, -1, att.head_dim).transpose(1, 2) for p in (att.q_proj, att.k_proj, att.v_proj))


def _attend(cfg: PruneConfig, att: nn.Module, out_proj: nn.Module, x: torch.Tensor, scale: float):
    """The attention module's output for ``x`` by the scoring attention, and its stats."""
    B, N, _ = x.shape
    stats = attention(cfg, *_heads(att, x), scale)
    # Hand on the scores only: the attention output must not outlive the projection (peak memory).
    return out_proj(stats.out.transpose(1, 2).reshape(B, N, -1)), stats._replace(out=None)


def _no_mask(attention_mask: torch.Tensor | None) -> None:
    if attention_mask is not None:
        raise ValueError("pruneattn: patched layers take no attention_mask")


class _PrunedViTLayer:
    """Forward of a patched ``ViTLayer`` / ``DeiTLayer`` (identical structure)."""

    _pruneattn: PruneConfig

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        _no_mask(attention_mask)
        att = self.attention
        out, stats = _attend(self._pruneattn, att, att.o_proj, self.layernorm_before(hidden_states), att.scaling)
        h = prune_tokens(self._pruneattn, self.dropout(out) + hidden_states, stats)
        return self.dropout(self.mlp(self.layernorm_after(h))) + h


class _PrunedEncoderLayer:
    """Forward of a patched ``CLIPEncoderLayer`` / ``SiglipEncoderLayer`` (identical structure)."""

    _pruneattn: PruneConfig

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        _no_mask(attention_mask)
        att = self.self_attn
        out, stats = _attend(self._pruneattn, att, att.out_proj, self.layer_norm1(hidden_states), att.scale)
        h = prune_tokens(self._pruneattn, hidden_states + out, stats)
        return h + self.mlp(self.layer_norm2(h))


class _PrunedDinov2Layer:
    """Forward of a patched ``Dinov2Layer`` / ``Dinov2WithRegistersLayer`` (layer scale, drop path)."""

    _pruneattn: PruneConfig

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        _no_mask(attention_mask)
        att = self.attention
        out, stats = _attend(self._pruneattn, att, att.o_proj, self.norm1(hidden_states), att.scaling)
        h = prune_tokens(self._pruneattn, self.drop_path(self.layer_scale1(out)) + hidden_states, stats)
        return self.drop_path(self.layer_scale2(self.mlp(self.norm2(h)))) + h


class PrunedViTLayer(_PrunedViTLayer, ViTLayer):
    pass


class PrunedDeiTLayer(_PrunedViTLayer, DeiTLayer):
    pass


class PrunedCLIPEncoderLayer(_PrunedEncoderLayer, CLIPEncoderLayer):
    pass


class PrunedSiglipEncoderLayer(_PrunedEncoderLayer, SiglipEncoderLayer):
    pass


class PrunedDinov2Layer(_PrunedDinov2Layer, Dinov2Layer):
    pass


class PrunedDinov2WithRegistersLayer(_PrunedDinov2Layer, Dinov2WithRegistersLayer):
    pass


PRUNED_CLASSES = {
    ViTLayer: PrunedViTLayer,
    DeiTLayer: PrunedDeiTLayer,
    CLIPEncoderLayer: PrunedCLIPEncoderLayer,
    SiglipEncoderLayer: PrunedSiglipEncoderLayer,
    Dinov2Layer: PrunedDinov2Layer,
    Dinov2WithRegistersLayer: PrunedDinov2WithRegistersLayer,
}


def _encoder(model: nn.Module) -> nn.Module | None:
    """The vision encoder inside ``model`` (the model itself, its ``vision_model`` or its base model)."""
    if isinstance(model, _ENCODERS):
        return model
    for name in ("vision_model", getattr(model, "base_model_prefix", "")):
        sub = getattr(model, name, None) if name else None
        if isinstance(sub, _ENCODERS):
            return sub
    return None


def supports(model: nn.Module) -> bool:
    return type(model).__name__ in SUPPORTED and _encoder(model) is not None


def unsupported_reason(model: nn.Module) -> str | None:
    return None


def blocks(model: nn.Module) -> list[nn.Module]:
    enc = _encoder(model)
    holder = enc if hasattr(enc, "layers") else enc.encoder  # ViT / DeiT hold their layers directly
    return list(holder.layers if hasattr(holder, "layers") else holder.layer)


def num_prefix(model: nn.Module) -> int:
    """Tokens before the patches: [CLS] (+ DeiT's distillation token, + DINOv2's registers; none in SigLIP)."""
    enc = _encoder(model)
    if isinstance(enc, DeiTModel):
        return 2
    if isinstance(enc, SiglipVisionModel):
        return 0
    if isinstance(enc, Dinov2WithRegistersModel):
        return 1 + int(enc.config.num_register_tokens)
    return 1


def has_class_token(model: nn.Module) -> bool:
    return not isinstance(_encoder(model), SiglipVisionModel)


def _attention_dropout(block: nn.Module) -> float:
    att = getattr(block, "attention", None) or block.self_attn
    p = getattr(att, "attention_dropout", None)
    return float(att.dropout if p is None else p)


def check_block(block: nn.Module, layer: int) -> None:
    if type(block) not in PRUNED_CLASSES and type(block) not in PRUNED_CLASSES.values():
        names = ", ".join(c.__name__ for c in PRUNED_CLASSES)
        raise TypeError(f"pruneattn.patch: layer {layer} is {type(block).__name__}; supported layers: {names}")
    p = _attention_dropout(block)
    if p > 0:
        raise ValueError(
            f"pruneattn.patch: layer {layer} uses attention dropout (p={p}), which the fused attention cannot "
            "apply; set the config's attention dropout to 0 first"
        )
