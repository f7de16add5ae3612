"""Hugging Face ``ViTModel`` / ``ViTForImageClassification`` and ``DeiTModel`` / ``DeiTForImageClassification``
(``WithTeacher`` too).

Their layers (``ViTLayer``, ``DeiTLayer``) compute q, k, v with separate ``q_proj`` / ``k_proj`` /
``v_proj`` Linears, attention through ``ALL_ATTENTION_FUNCTIONS`` (eager / SDPA / flash), then
``o_proj``, hidden dropout and the residual. The patched layer runs the same projections and replaces
only the attention function by :func:`pruneattn.attention_stats`, whatever ``_attn_implementation``
says. Hidden states recorded with ``output_hidden_states`` have the pruned token counts;
``output_attentions`` records nothing for patched layers (no attention matrix is formed).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.models.deit.modeling_deit import DeiTLayer, DeiTModel
from transformers.models.vit.modeling_vit import ViTLayer, ViTModel

from pruneattn.patch.prune import PruneConfig, attention, prune_tokens

SUPPORTED = (
    "ViTModel",
    "ViTForImageClassification",
    "DeiTModel",
    "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher",
)


class _PrunedLayer:
    """Forward of a patched ``ViTLayer`` / ``DeiTLayer`` (identical structure in transformers 5.x)."""

    _pruneattn: PruneConfig

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("pruneattn: patched layers take no attention_mask")
        att = self.attention
        x = self.layernorm_before(hidden_states)
        B, N, _ = x.shape
        heads = (B, N, -1, att.head_dim)
        q = att.q_proj(x).view(heads).transpose(1, 2)
        k = att.k_proj(x).view(heads).transpose(1, 2)
        v = att.v_proj(x).view(heads).transpose(1, 2)
        stats = attention(self._pruneattn, q, k, v, att.scaling)
        out = att.o_proj(stats.out.transpose(1, 2).reshape(B, N, -1))
        h = prune_tokens(self._pruneattn, self.dropout(out) + hidden_states, stats)
        return self.dropout(self.mlp(self.layernorm_after(h))) + h


class PrunedViTLayer(_PrunedLayer, ViTLayer):
    pass


class PrunedDeiTLayer(_PrunedLayer, DeiTLayer):
    pass


PRUNED_CLASSES = {ViTLayer: PrunedViTLayer, DeiTLayer: PrunedDeiTLayer}


def supports(model: nn.Module) -> bool:
    return type(model).__name__ in SUPPORTED and isinstance(_backbone(model), (ViTModel, DeiTModel))


def _backbone(model: nn.Module) -> nn.Module:
    return model if isinstance(model, (ViTModel, DeiTModel)) else getattr(model, model.base_model_prefix, None)


def blocks(model: nn.Module) -> list[nn.Module]:
    return list(_backbone(model).layers)


def num_prefix(model: nn.Module) -> int:
    return 2 if isinstance(_backbone(model), DeiTModel) else 1  # [CLS] (+ distillation token)


def has_class_token(model: nn.Module) -> bool:
    return True


def check_block(block: nn.Module, layer: int) -> None:
    if type(block) not in (ViTLayer, DeiTLayer, PrunedViTLayer, PrunedDeiTLayer):
        raise TypeError(f"pruneattn.patch: layer {layer} is {type(block).__name__}, not ViTLayer / DeiTLayer")
    p = block.attention.attention_dropout
    if p > 0:
        raise ValueError(
            f"pruneattn.patch: layer {layer} uses attention dropout (attention_probs_dropout_prob={p}), which "
            "the fused attention cannot apply; set it to 0 first"
        )
