"""open_clip: the vision tower ``VisionTransformer`` (``model.visual`` of ``open_clip.create_model(...)``).

Its ``ResidualAttentionBlock`` runs ``nn.MultiheadAttention``; a patched block reads that module's packed
``in_proj_weight`` / ``in_proj_bias`` and ``out_proj`` in place (no new parameters) and replaces only the
attention by pruneattn's scoring attention. Hooks on the tower give each forward call its own pruning
state; its patch dropout (train mode) records which patches it kept, so that kept indices index the
original grid. Its pooling (class token, average, or the attentional pooler) reads the kept tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import PatchDropout
from torch import nn

from pruneattn.ops import split_qkv
from pruneattn.patch.blocks import BlockShape, PrunedSequential
from pruneattn.patch.registry import Family
from pruneattn.patch.state import Plan, begin, current, end
from pruneattn.patch.swap import Swapped, swap


class MultiheadReader:
    """q, k, v of ``nn.MultiheadAttention`` (batch first, packed input projection) and its output."""

    def heads(self, att: nn.MultiheadAttention, x: torch.Tensor, rope: torch.Tensor | None):
        return split_qkv(F.linear(x, att.in_proj_weight, att.in_proj_bias), att.num_heads)

    def scale(self, att: nn.MultiheadAttention) -> float:
        return float(att.head_dim) ** -0.5

    def project(self, att: nn.MultiheadAttention, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        B, H, N, d = out.shape
        return att.out_proj(out.transpose(1, 2).reshape(B, N, H * d))

    def dropout(self, att: nn.MultiheadAttention) -> float:
        return float(att.dropout)


READER = MultiheadReader()


class PrunedPatchDropout(Swapped):
    """open_clip's patch dropout that also tells the forward call which patches it kept (train mode);
    the same draws as open_clip's own."""

    _pruneattn_plan: Plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0.0:
            return x
        cls_tokens, x = x[:, :1], x[:, 1:]
        batch, num_tokens = x.shape[:2]
        keep = max(1, int(num_tokens * (1 - self.prob)))
        indices = torch.randn(batch, num_tokens).topk(keep, dim=-1).indices.to(x.device)
        state = current(self._pruneattn_plan)
        if state is not None:
            state.origin = indices
        x = x.gather(1, indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return torch.cat((cls_tokens, x), dim=1)


def _begin_call(tower: nn.Module, args: tuple) -> None:
    begin(tower._pruneattn_plan)


def _end_call(tower: nn.Module, args: tuple, output: object) -> None:
    state = current(tower._pruneattn_plan)
    if state is not None:
        end(state, output is not None)


class OpenClipAdapter:
    """The :class:`pruneattn.patch.registry.Adapter` of open_clip's vision tower."""

    def encoder(self, family: Family, model: nn.Module) -> nn.Module:
        found = [m for m in model.modules() if type(m).__name__ in family.encoder and type(m).__module__.startswith("open_clip")]
        if len(found) != 1:
            raise TypeError(
                f"pruneattn.patch: expected one open_clip VisionTransformer in this {type(model).__name__}, "
                f"found {len(found)}"
            )
        tower = found[0]
        if not getattr(tower.transformer, "batch_first", True):
            raise TypeError(
                "pruneattn.patch: this open_clip tower runs its blocks sequence-first (batch_first=False); "
                "build it with a current open_clip (batch first) to patch it"
            )
        dropout = tower.patch_dropout
        if isinstance(dropout, PatchDropout) and dropout.prob > 0 and not dropout.exclude_first_token:
            raise TypeError(
                "pruneattn.patch: this open_clip tower's patch dropout may drop the class token "
                "(exclude_first_token=False), so the prefix would not be fixed"
            )
        return tower

    def has_class_token(self, family: Family, model: nn.Module) -> bool:
        return True

    def reader(self, family: Family) -> MultiheadReader:
        return READER

    def pruned_block(self, shape: BlockShape, family: Family) -> type:
        return PrunedSequential

    def attach(self, family: Family, encoder: nn.Module, plan: Plan) -> None:
        encoder._pruneattn_plan = plan
        encoder._pruneattn_hooks = (
            encoder.register_forward_pre_hook(_begin_call),
            encoder.register_forward_hook(_end_call, always_call=True),
        )
        if isinstance(encoder.patch_dropout, PatchDropout):
            swap(encoder.patch_dropout, PrunedPatchDropout)
            encoder.patch_dropout._pruneattn_plan = plan

    def check_block(self, family: Family, block: nn.Module, shape: BlockShape, layer: int) -> None:
        att = block.attn
        if not isinstance(att, nn.MultiheadAttention) or not att.batch_first or not att._qkv_same_embed_dim:
            raise TypeError(
                f"pruneattn.patch: block {layer}'s attention is not a batch-first nn.MultiheadAttention with one "
                "packed input projection"
            )
        if hasattr(block, "ln_1_kv"):
            raise TypeError(f"pruneattn.patch: block {layer} is a cross-attention block (ln_1_kv)")


ADAPTER = OpenClipAdapter()
