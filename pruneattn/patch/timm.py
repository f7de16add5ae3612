"""timm models: ``VisionTransformer`` (vit_*, deit_*, distilled, registers, parallel and post-norm blocks)
and ``Eva`` (EVA02, ``vit_*_rope*``, DINOv3: rotary embeddings, SwiGLU, layer scale, registers).

Every supported block gets a pruning subclass with the same parameters; where pruning sits follows
docs/semantics.md ("Model families"): after the attention residual, or after the whole block for
parallel blocks. The model's class is swapped too (ToMe style), so that

- ``Eva`` rotates every token by its ORIGINAL grid position after a pruning block: the rotary table is
  gathered per image with the composed kept indices, in the pruning blocks and all later ones;
- ``forward_intermediates`` / ``get_intermediate_layers`` follow the grid rule: a grid-shaped output
  (``NCHW``) holds, for every dropped patch, its value in the block that dropped it; ``NLC`` outputs
  keep the pruned token count.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention, AttentionRope, apply_rot_embed_cat
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
from timm.models.vision_transformer import (
    Block,
    ParallelScalingBlock,
    ParallelThingsBlock,
    ResPostBlock,
    VisionTransformer,
)
from torch import nn

from pruneattn.ops import AttentionStats, split_qkv
from pruneattn.patch.positions import compose, paint, rotary_table
from pruneattn.patch.prune import PruneConfig, attention, prune_tokens

SUPPORTED = (
    "timm VisionTransformer (vit_*, deit_* incl. distilled, registers, avg pooling, parallel and post-norm "
    "blocks) and Eva (eva02_*, vit_*_rope*, vit_*_dinov3)"
)

# Model classes that look like ViTs but whose attention pruneattn cannot reproduce, with the reason.
UNSUPPORTED = {
    "Beit": "its attention adds a relative position bias per token pair, which the fused kernels do not take",
    "VisionTransformerRelPos": "its attention adds a relative position bias per token pair, which the fused "
    "kernels do not take",
    "Cait": "its class-attention blocks attend from the class token only, so patch scores are not defined the same way",
    "Xcit": "its cross-covariance attention attends over channels, not tokens",
    "NaFlexVit": "it runs with padding masks over variable-size patch sets, which the fused kernels do not take",
    "VisionTransformerSAM": "its windowed attention with relative position bias is not global attention",
}

# ----------------------------------------------------------------------------- attention modules

_ATTENTIONS = (Attention, EvaAttention, AttentionRope)


def _heads(
    a: nn.Module, x: torch.Tensor, rope: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, H, N, d) of timm's ``Attention`` / ``EvaAttention`` / ``AttentionRope``, as their forward
    makes them: fused or separate projections, Eva's q/v biases, q/k norm, rotary embedding of the tokens
    after the prefix, grouped k/v heads expanded."""
    B, N, _ = x.shape
    if a.qkv is not None:
        q_bias = getattr(a, "q_bias", None)
        if q_bias is None:
            qkv = a.qkv(x)
        else:  # EvaAttention: k has no bias
            qkv = F.linear(x, a.qkv.weight, torch.cat((q_bias, a.k_bias, a.v_bias)))
        q, k, v = split_qkv(qkv, a.num_heads)
    else:
        q, k, v = (p(x).view(B, N, -1, a.head_dim).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
    q, k = a.q_norm(q), a.k_norm(k)
    if rope is not None:
        npt, half = a.num_prefix_tokens, getattr(a, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
    groups = getattr(a, "num_kv_groups", 1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if q.dtype != v.dtype:  # autocast runs q_norm / k_norm in float32
        q, k = q.to(v.dtype), k.to(v.dtype)
    return q, k, v


def _merge(a: nn.Module, out: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """The attention module's output projection of ``out`` (B, H, N, d): norm, gate, proj, dropout."""
    B, _, N, _ = out.shape
    x = a.norm(out.transpose(1, 2).reshape(B, N, -1))  # free: out is (B, N, H, d) in memory
    if gate is not None:
        x = x * gate
    return a.proj_drop(a.proj(x))


def _attend(
    cfg: PruneConfig, a: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None
) -> tuple[torch.Tensor, AttentionStats]:
    """``a(x, rope=rope)`` computed by the scoring attention; also returns its stats."""
    gate = a.gate(x).sigmoid() if getattr(a, "gate", None) is not None else None
    stats = attention(cfg, *_heads(a, x, rope), a.scale)
    # Hand on the scores only: the attention output must not outlive the projection (peak memory).
    return _merge(a, stats.out, gate), stats._replace(out=None)


def _no_mask(attn_mask: torch.Tensor | None, is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("pruneattn: patched blocks take no attn_mask / is_causal")


# ----------------------------------------------------------------------------- blocks


class PrunedBlock(Block):
    """timm ``Block`` that prunes patch tokens between its attention and its MLP (same parameters)."""

    _pruneattn: PruneConfig

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        _no_mask(attn_mask, is_causal)
        y, stats = _attend(self._pruneattn, self.attn, self.norm1(x))
        x = prune_tokens(self._pruneattn, x + self.drop_path1(self.ls1(y)), stats)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class PrunedResPostBlock(ResPostBlock):
    """timm ``ResPostBlock`` (norm after each branch) that prunes after its attention residual."""

    _pruneattn: PruneConfig

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        _no_mask(attn_mask, is_causal)
        y, stats = _attend(self._pruneattn, self.attn, x)
        x = prune_tokens(self._pruneattn, x + self.drop_path1(self.norm1(y)), stats)
        return x + self.drop_path2(self.norm2(self.mlp(x)))


class PrunedParallelScalingBlock(ParallelScalingBlock):
    """timm ``ParallelScalingBlock`` (``x + attn(x) + mlp(x)`` from one input projection): the whole block
    runs on all tokens, then selection on its output with its attention's scores."""

    _pruneattn: PruneConfig

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        _no_mask(attn_mask, is_causal)
        B, N, C = x.shape
        x_mlp, q, k, v = torch.split(self.in_proj(self.in_norm(x)), self.in_split, dim=-1)
        if self.mlp_bias is not None:
            x_mlp = x_mlp + self.mlp_bias
        heads = (B, N, self.num_heads, self.head_dim)
        q = self.q_norm(q.view(heads)).transpose(1, 2)
        k = self.k_norm(k.view(heads)).transpose(1, 2)
        v = v.view(heads).transpose(1, 2)
        if q.dtype != v.dtype:
            q, k = q.to(v.dtype), k.to(v.dtype)
        stats = attention(self._pruneattn, q, k, v, self.scale)
        x_attn = stats.out.transpose(1, 2).reshape(B, N, C)
        x_mlp = self.mlp_drop(self.mlp_act(x_mlp))
        if self.out_proj is not None:
            y = self.out_proj(torch.cat((x_attn, x_mlp), dim=-1))
        else:
            y = self.attn_out_proj(x_attn) + self.mlp_out_proj(x_mlp)
        return prune_tokens(self._pruneattn, x + self.drop_path(self.ls(y)), stats)


class PrunedParallelThingsBlock(ParallelThingsBlock):
    """timm ``ParallelThingsBlock`` (several attentions side by side, then several MLPs): the scores are
    taken over the heads of all its attentions together (one scoring attention call), selection after
    the summed attention residual."""

    _pruneattn: PruneConfig

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        _no_mask(attn_mask, is_causal)
        heads, gates = [], []
        for branch in self.attns:
            h = branch.norm(x)
            gates.append(branch.attn.gate(h).sigmoid() if branch.attn.gate is not None else None)
            heads.append(_heads(branch.attn, h, None))
        q, k, v = (torch.cat(t, dim=1) for t in zip(*heads))
        stats = attention(self._pruneattn, q, k, v, self.attns[0].attn.scale)
        outs = stats.out.split([qkv[0].shape[1] for qkv in heads], dim=1)
        y = sum(b.drop_path(b.ls(_merge(b.attn, o, g))) for b, o, g in zip(self.attns, outs, gates))
        x = prune_tokens(self._pruneattn, x + y, stats)
        return x + torch.stack([ffn(x) for ffn in self.ffns]).sum(dim=0)


class PrunedEvaBlock(EvaBlock):
    """timm ``EvaBlock`` (rotary attention, optional ``gamma_1`` / ``gamma_2`` layer scale, SwiGLU) that
    prunes after its attention residual. ``rope`` is the table for the current tokens (see ``PrunedEva``)."""

    _pruneattn: PruneConfig

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        _no_mask(attn_mask, is_causal)
        y, stats = _attend(self._pruneattn, self.attn, self.norm1(x), rope)
        if self.gamma_1 is not None:
            y = self.gamma_1 * y
        x = prune_tokens(self._pruneattn, x + self.drop_path1(y), stats)
        y = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            y = self.gamma_2 * y
        return x + self.drop_path2(y)


class PrunedEvaBlockPostNorm(EvaBlockPostNorm):
    """timm ``EvaBlockPostNorm`` (norm after each branch) that prunes after its attention residual."""

    _pruneattn: PruneConfig

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        _no_mask(attn_mask, is_causal)
        y, stats = _attend(self._pruneattn, self.attn, x, rope)
        x = prune_tokens(self._pruneattn, x + self.drop_path1(self.norm1(y)), stats)
        return x + self.drop_path2(self.norm2(self.mlp(x)))


PRUNED_CLASSES = {
    Block: PrunedBlock,
    ResPostBlock: PrunedResPostBlock,
    ParallelScalingBlock: PrunedParallelScalingBlock,
    ParallelThingsBlock: PrunedParallelThingsBlock,
    EvaBlock: PrunedEvaBlock,
    EvaBlockPostNorm: PrunedEvaBlockPostNorm,
}
_ORIGINAL = {v: k for k, v in PRUNED_CLASSES.items()}


def _block_attentions(block: nn.Module) -> list[nn.Module]:
    if isinstance(block, ParallelThingsBlock):
        return [branch.attn for branch in block.attns]
    if isinstance(block, ParallelScalingBlock):
        return []
    return [block.attn]


# ----------------------------------------------------------------------------- the model


def _run_blocks(
    model: nn.Module,
    blocks: nn.Sequential | nn.ModuleList,
    images: torch.Tensor,
    take: set[int] | list[int] = (),
    grid: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Embed ``images`` and run ``blocks``; returns the output tokens and the tokens after each block in
    ``take``. (The embedding happens here so that no caller's local keeps the first tokens alive.)

    The rotary table (``rope``; per block for ``rope_mixed`` models) follows the kept patches. With
    ``grid``, the taken outputs are prefix + a full grid of patches: dropped patches keep the value they
    had after the attention residual of the block that dropped them."""
    x, rope = _embed(model, images)
    npt = model.num_prefix_tokens
    per_block = rope is not None and getattr(model, "rope_mixed", False)
    configs = [getattr(b, "_pruneattn", None) for b in blocks]
    # (the grid holds the tokens only when asked: otherwise it would keep the first block's input alive)
    pos, fused, canvas, taken = None, False, x[:, npt:] if grid else None, []
    P = x.shape[1] - npt  # patch tokens (no fused token)
    for cfg in configs:
        if cfg is not None:
            cfg.record = grid
    try:
        for i, blk in enumerate(blocks):
            kw = {}
            if isinstance(model, Eva):
                table = rope[i] if per_block else rope
                kw["rope"] = None if table is None else rotary_table(table, pos, fused)
            if model.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(blk, x, **kw)
            else:
                x = blk(x, **kw)
            cfg = configs[i]
            if cfg is not None and cfg.keep_rate < 1:
                if grid:  # dropped patches keep their value after this block's attention residual
                    canvas = paint(canvas, cfg.pre_select[:, npt : npt + P], pos)
                pos, fused = compose(pos, cfg.kept_idx), fused or cfg.mode == "fuse"
                P = pos.shape[1]
            if i in take:
                if grid:
                    canvas = paint(canvas, x[:, npt : npt + P], pos)
                    taken.append(torch.cat([x[:, :npt], canvas], dim=1))
                else:
                    taken.append(x)
    finally:
        for cfg in configs:
            if cfg is not None:
                cfg.record, cfg.pre_select = False, None
    return x, taken


def _embed(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens before the first block (and the rotary table of an ``Eva``), as the model's forward makes them."""
    x = model.patch_embed(images)
    if isinstance(model, Eva):
        x, rope = model._pos_embed(x)
        return model.norm_pre(x), rope
    return model.norm_pre(model.patch_drop(model._pos_embed(x))), None


class PrunedModel:
    """Mixed into a patched timm model's class: block loop with the rotary table and the intermediates
    following the kept patches. No state of its own; ``unpatch`` restores the original class."""

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        _no_mask(attn_mask, is_causal)
        x, _ = _run_blocks(self, self.blocks, x)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ):
        """timm's ``forward_intermediates`` for a pruned model. ``NCHW`` grids hold every patch: a dropped
        patch takes its value in the block that dropped it, the fused token is left out; ``NLC`` outputs
        keep the pruned token count (see ``pruneattn.kept_indices`` for where the tokens sit)."""
        _no_mask(attn_mask, is_causal)
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        x, inter = _run_blocks(self, blocks, x, set(take), grid=output_fmt == "NCHW")
        inter = [self.norm(y) if norm else y for y in inter]
        npt = self.num_prefix_tokens
        prefix = [y[:, :npt] for y in inter] if npt else None
        inter = [y[:, npt:] for y in inter]
        if output_fmt == "NCHW":
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            inter = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in inter]
        if output_dict:
            out = {"image_intermediates": inter}
            if prefix is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens and prefix is not None:
            inter = list(zip(inter, prefix))
        return inter if intermediates_only else (self.norm(x), inter)


_MODEL_CLASSES: dict[type, type] = {}


def model_class(cls: type) -> type:
    """The patched class of a timm model class (made once per class, like ToMe's; a module attribute,
    so that a patched model pickles)."""
    if cls not in _MODEL_CLASSES:
        name = f"Pruned{cls.__name__}"
        _MODEL_CLASSES[cls] = globals()[name] = type(name, (PrunedModel, cls), {"__module__": __name__})
    return _MODEL_CLASSES[cls]


for _cls in (VisionTransformer, VisionTransformerDistilled, Eva):
    model_class(_cls)


# ----------------------------------------------------------------------------- adapter interface


def supports(model: nn.Module) -> bool:
    return isinstance(model, (VisionTransformer, Eva))


def unsupported_reason(model: nn.Module) -> str | None:
    """Why a known timm ViT-like class cannot be patched, or None."""
    for cls in type(model).__mro__:
        if cls.__name__ in UNSUPPORTED:
            return UNSUPPORTED[cls.__name__]
    return None


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks, in order."""
    return list(model.blocks)


def num_prefix(model: nn.Module) -> int:
    return int(model.num_prefix_tokens)


def has_class_token(model: nn.Module) -> bool:
    return getattr(model, "cls_token", None) is not None or bool(getattr(model, "has_class_token", False))


def check_block(block: nn.Module, layer: int) -> None:
    """Raise unless ``block`` is a timm block pruneattn can run (see ``PRUNED_CLASSES``)."""
    cls = _ORIGINAL.get(type(block), type(block))
    attns = _block_attentions(block) if cls in PRUNED_CLASSES else []
    bad = [type(a).__name__ for a in attns if not isinstance(a, _ATTENTIONS)]
    if cls not in PRUNED_CLASSES or bad:
        names = ", ".join(c.__name__ for c in PRUNED_CLASSES)
        what = f" with attention {bad[0]}" if bad else ""
        raise TypeError(
            f"pruneattn.patch: block {layer} is a {type(block).__name__}{what}; supported timm blocks: {names} "
            "with timm's Attention, EvaAttention or AttentionRope"
        )
    for a in attns:
        if a.attn_drop.p > 0:
            raise ValueError(
                f"pruneattn.patch: block {layer} uses attention dropout (p={a.attn_drop.p}), which the "
                "fused attention cannot apply; set its attn_drop.p = 0 first"
            )
    if isinstance(block, ParallelScalingBlock) and block.attn_drop.p > 0:
        raise ValueError(
            f"pruneattn.patch: block {layer} uses attention dropout (p={block.attn_drop.p}); set attn_drop.p = 0 first"
        )
