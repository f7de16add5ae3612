"""timm ``VisionTransformer`` family (vit_*, deit_*, distilled, register tokens, avg pooling)."""
from __future__ import annotations

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from pruneattn.ops import AttentionStats, split_qkv
from pruneattn.patch.prune import PruneConfig, attention, prune_tokens


class PrunedBlock(Block):
    """timm ``Block`` that prunes patch tokens between its attention and its MLP (same parameters)."""

    _pruneattn: PruneConfig

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("pruneattn: patched blocks take no attn_mask / is_causal")
        y, stats = self._attention(self.norm1(x))
        x = prune_tokens(self._pruneattn, x + self.drop_path1(self.ls1(y)), stats)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _attention(self, x: torch.Tensor) -> tuple[torch.Tensor, AttentionStats]:
        """timm ``Attention.forward`` computed by the scoring attention; also returns its stats."""
        a = self.attn
        B, N, _ = x.shape
        gate = a.gate(x).sigmoid() if a.gate is not None else None
        q, k, v = split_qkv(a.qkv(x), a.num_heads)
        q, k = a.q_norm(q), a.k_norm(k)
        if q.dtype != v.dtype:  # autocast runs q_norm / k_norm in float32
            q, k = q.to(v.dtype), k.to(v.dtype)
        stats = attention(self._pruneattn, q, k, v, a.scale)
        x = stats.out.transpose(1, 2).reshape(B, N, a.attn_dim)  # free: out is (B, N, H, d) in memory
        x = a.norm(x)
        if gate is not None:
            x = x * gate
        return a.proj_drop(a.proj(x)), stats


def supports(model: nn.Module) -> bool:
    return isinstance(model, VisionTransformer)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks, in order."""
    return list(model.blocks)


def num_prefix(model: nn.Module) -> int:
    return int(model.num_prefix_tokens)


def has_class_token(model: nn.Module) -> bool:
    return bool(getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None))


def check_block(block: nn.Module, layer: int) -> None:
    """Raise unless ``block`` is a plain timm ``Block`` with standard ``Attention``."""
    attn = getattr(block, "attn", None)
    if type(block) not in (Block, PrunedBlock) or type(attn) is not Attention:
        raise TypeError(
            f"pruneattn.patch: block {layer} is a {type(block).__name__} with attention {type(attn).__name__}; "
            "only timm's Block with the standard Attention is supported"
        )
    if block.attn.attn_drop.p > 0:
        raise ValueError(
            f"pruneattn.patch: block {layer} uses attention dropout (p={block.attn.attn_drop.p}), which the "
            "fused attention cannot apply; set block.attn.attn_drop.p = 0 first"
        )


PRUNED_CLASSES = {Block: PrunedBlock}
