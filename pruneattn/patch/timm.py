"""timm: ``VisionTransformer`` (vit_*, deit_*, distilled, registers, parallel and post-norm blocks),
``Eva`` (EVA02, ``vit_*_rope*``, DINOv3: rotary embedding, SwiGLU, layer scale, registers) and
``NaFlexVit`` (images of different sizes in one batch, padded, with ``patch_valid``).

The families are entries of :mod:`pruneattn.patch.registry`; this module reads timm's attention
modules, holds the forwards of timm's parallel blocks, and swaps the model's class (ToMe style) so that

- each forward call has its own pruning state (:mod:`pruneattn.patch.state`);
- ``Eva`` rotates every token by its ORIGINAL grid position after a pruning block: the rotary table is
  gathered per image with the composed kept indices, in the pruning blocks and all later ones;
- ``forward_intermediates`` / ``get_intermediate_layers`` follow the grid rule: a grid-shaped output
  (``NCHW``) holds, for every dropped patch, its value in the block that dropped it; ``NLC`` outputs
  keep the pruned token count;
- patch dropout (train mode) records which patches it kept, so that kept indices index the original grid;
- ``NaFlexVit`` runs its blocks with the call's padding mask (a broadcast (B, 1, 1, N) key mask, rebuilt
  after each pruning block for the tokens that remain) and pools with the mask of the kept tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention, AttentionRope, apply_rot_embed_cat
from timm.layers.patch_dropout import PatchDropout, PatchDropoutWithIndices, patch_dropout_forward
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models.eva import Eva, EvaAttention
from timm.models.naflexvit import NaFlexVit, apply_keep_indices_nlc
from timm.models.vision_transformer import ParallelScalingBlock, ParallelThingsBlock
from torch import nn

from pruneattn._versions import release
from pruneattn.ops import split_qkv
from pruneattn.patch.blocks import BlockShape, PrunedSequential, Sequential
from pruneattn.patch.masks import check_no_mask, key_mask
from pruneattn.patch.positions import compose, paint, rotary_table
from pruneattn.patch.prune import attention, check_traceable, prune_tokens
from pruneattn.patch.registry import Family
from pruneattn.patch.state import ForwardState, Plan, begin, current, end, scoped
from pruneattn.patch.swap import Swapped, original_class, swap

_ATTENTIONS = (Attention, EvaAttention, AttentionRope)


class TimmReader:
    """q, k, v of timm's ``Attention`` / ``EvaAttention`` / ``AttentionRope``, as their forward makes them:
    fused or separate projections, Eva's q/v biases, q/k norm, rotary embedding of the tokens after the
    prefix, grouped k/v heads expanded; the output through norm, gate, projection and dropout."""

    def heads(self, a: nn.Module, x: torch.Tensor, rope: torch.Tensor | None):
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

    def scale(self, a: nn.Module) -> float:
        return float(a.scale)  # a Python float: torch.compile(dynamic=True) would otherwise trace it symbolic

    def project(self, a: nn.Module, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        B, H, N, d = out.shape
        y = a.norm(out.transpose(1, 2).reshape(B, N, H * d))  # free: out is (B, N, H, d) in memory
        if getattr(a, "gate", None) is not None:
            y = y * a.gate(x).sigmoid()
        return a.proj_drop(a.proj(y))

    def dropout(self, a: nn.Module) -> float:
        return float(a.attn_drop.p)


READER = TimmReader()


class PrunedParallelScaling(Swapped):
    """timm ``ParallelScalingBlock`` (``x + attn(x) + mlp(x)`` from one input projection): the whole block
    runs on all tokens, then selection on its output with its attention's scores."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        check_traceable(x)
        check_no_mask(args, kwargs)
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
        dropout = READER.dropout(self) if self.training else 0.0
        stats = attention(self._pruneattn, q, k, v, float(self.scale), dropout=dropout)
        x_attn = stats.out.transpose(1, 2).reshape(B, N, C)
        x_mlp = self.mlp_drop(self.mlp_act(x_mlp))
        if self.out_proj is not None:
            y = self.out_proj(torch.cat((x_attn, x_mlp), dim=-1))
        else:
            y = self.attn_out_proj(x_attn) + self.mlp_out_proj(x_mlp)
        return prune_tokens(self._pruneattn, x + self.drop_path(self.ls(y)), stats)


class PrunedParallelThings(Swapped):
    """timm ``ParallelThingsBlock`` (several attentions side by side, then several MLPs): the scores are
    taken over the heads of all its attentions together (one scoring attention call), selection after
    the summed attention residual."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        check_traceable(x)
        check_no_mask(args, kwargs)
        inputs = [branch.norm(x) for branch in self.attns]
        heads = [READER.heads(branch.attn, h, None) for branch, h in zip(self.attns, inputs)]
        q, k, v = (torch.cat(t, dim=1) for t in zip(*heads))
        first = self.attns[0].attn  # (every branch has its dropout: checked by patch)
        dropout = READER.dropout(first) if first.training else 0.0
        stats = attention(self._pruneattn, q, k, v, READER.scale(first), dropout=dropout)
        outs = stats.out.split([qkv[0].shape[1] for qkv in heads], dim=1)
        y = sum(b.drop_path(b.ls(READER.project(b.attn, o, h))) for b, o, h in zip(self.attns, outs, inputs))
        x = prune_tokens(self._pruneattn, x + y, stats)
        return x + torch.stack([ffn(x) for ffn in self.ffns]).sum(dim=0)


_PARALLEL = {"ParallelScalingBlock": PrunedParallelScaling, "ParallelThingsBlock": PrunedParallelThings}


def _block_attentions(block: nn.Module) -> list[nn.Module]:
    if isinstance(block, ParallelThingsBlock):
        return [branch.attn for branch in block.attns]
    if isinstance(block, ParallelScalingBlock):
        return [block]  # its attention lives in the block (attn_drop, scale)
    return [block.attn]


# ----------------------------------------------------------------------------- patch dropout


class PrunedPatchDropout(Swapped):
    """timm's patch dropout that also tells the forward call which patches it kept (train mode)."""

    _pruneattn_plan: Plan

    def forward(self, x: torch.Tensor):
        out, keep = patch_dropout_forward(x, self.prob, self.num_prefix_tokens, self.ordered, self.training)
        state = current(self._pruneattn_plan)
        if state is not None:
            state.origin = keep
        return (out, keep) if isinstance(self, PatchDropoutWithIndices) else out


# ----------------------------------------------------------------------------- the model


def _embed(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens before the first block (and the rotary table of an ``Eva``), as the model's forward makes them."""
    x = model.patch_embed(images)
    if isinstance(model, Eva):
        x, rope = model._pos_embed(x)
        return model.norm_pre(x), rope
    return model.norm_pre(model.patch_drop(model._pos_embed(x))), None


def _run_blocks(
    model: nn.Module,
    state: ForwardState,
    blocks: nn.Sequential | nn.ModuleList,
    images: torch.Tensor,
    take: set[int] | list[int] = (),
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Embed ``images`` and run ``blocks``; returns the output tokens and the tokens after each block in
    ``take``. (The embedding happens here so that no caller's local keeps the first tokens alive.)

    The rotary table (``rope``; per block for ``rope_mixed`` models) follows the kept patches. With
    ``state.record``, the taken outputs are prefix + a full grid of patches: dropped patches keep the value
    they had after the attention residual of the block that dropped them."""
    x, rope = _embed(model, images)
    npt = model.num_prefix_tokens
    per_block = rope is not None and getattr(model, "rope_mixed", False)
    configs = [getattr(b, "_pruneattn", None) for b in blocks]
    grid = state.record
    # (the grid holds the tokens only when asked: otherwise it would keep the first block's input alive)
    pos, fused, canvas, taken = None, False, x[:, npt:] if grid else None, []
    P = x.shape[1] - npt  # patch tokens (no fused token)
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
        if cfg is not None and cfg.selects:
            if grid:  # dropped patches keep their value after this block's attention residual
                canvas = paint(canvas, state.before_selection.pop(i)[:, npt : npt + P], pos)
            pos, fused = compose(pos, state.kept[i]), fused or cfg.mode == "fuse"
            P = pos.shape[1]
        if i in take:
            if grid:
                canvas = paint(canvas, x[:, npt : npt + P], pos)
                taken.append(torch.cat([x[:, :npt], canvas], dim=1))
            else:
                taken.append(x)
    return x, taken


class PrunedModel(Swapped):
    """Swapped into a patched timm model: each forward call gets its own pruning state; the block loop
    follows the kept patches (rotary tables, grids). ``unpatch`` restores the original class."""

    _pruneattn_plan: Plan

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        check_traceable(x)
        check_no_mask((attn_mask,), {"is_causal": is_causal})
        return scoped(self._pruneattn_plan, lambda state: self.norm(_run_blocks(self, state, self.blocks, x)[0]))

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
        check_traceable(x)
        check_no_mask((attn_mask,), {"is_causal": is_causal})
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        x, inter = scoped(
            self._pruneattn_plan, lambda state: _run_blocks(self, state, blocks, x, set(take)),
            record=output_fmt == "NCHW",
        )
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


def _run_naflex(model: nn.Module, state: ForwardState, patches, patch_coord, patch_valid) -> torch.Tensor:
    """``NaFlexVit``'s embedding and blocks with the call's padding mask and rotary tables following the
    kept patches; returns the tokens after the final norm."""
    embeds = model._forward_embeds(patches, patch_coord=patch_coord, patch_valid=patch_valid, attn_mask=None)
    x, rope, keep = embeds["patches"], embeds.get("rope_embeds"), embeds.get("keep_indices")
    npt = model.num_prefix_tokens
    valid = embeds.get("patch_valid")
    if valid is not None:
        valid = torch.cat([valid.new_ones((x.shape[0], npt), dtype=torch.bool), valid.bool()], dim=1)
    state.valid = valid
    mixed = model.rope_is_mixed and rope is not None
    tables = iter(rope) if mixed else None
    pos, fused = None, False
    for i, blk in enumerate(model.blocks):
        kw = {}
        if rope is not None:
            table = next(tables) if mixed else rope
            if mixed and keep is not None:
                table = apply_keep_indices_nlc(x, table, keep, pos_embed_has_batch=patch_coord is not None)
            kw["rope"] = rotary_table(table, pos, fused)
        if state.valid is not None:
            kw["attn_mask"] = key_mask(state.valid, x.dtype)
        if model.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            x = checkpoint(blk, x, **kw)
        else:
            x = blk(x, **kw)
        cfg = getattr(blk, "_pruneattn", None)
        if cfg is not None and cfg.selects:
            pos, fused = compose(pos, state.kept[i]), fused or cfg.mode == "fuse"
    return model.norm(x)


class PrunedNaFlex(Swapped):
    """Swapped into a patched timm ``NaFlexVit``: each forward call gets its own pruning state and padding
    mask; the head pools the kept tokens with their mask."""

    _pruneattn_plan: Plan

    def forward_features(self, patches, patch_coord=None, patch_valid=None, attn_mask=None):
        check_traceable(patches)
        if attn_mask is not None:
            raise ValueError(
                "pruneattn: a patched NaFlexVit builds its attention mask from patch_valid; pass patch_valid "
                "(and patch_coord), not attn_mask"
            )
        state = begin(self._pruneattn_plan)
        finished = False
        try:
            x = _run_naflex(self, state, patches, patch_coord, patch_valid)
            valid = state.valid
            finished = True
        finally:
            end(state, finished)
        if patch_coord is None:
            return x
        return {"patches": x, "patch_valid": None if valid is None else valid[:, self.num_prefix_tokens:]}

    def forward_intermediates(self, *args, **kwargs):
        raise TypeError(
            "pruneattn: forward_intermediates of a patched NaFlexVit is not supported (its intermediate "
            "tokens are padded per image); call forward_features, or unpatch for intermediates"
        )


if release(torch.__version__) < (2, 12):
    # torch 2.11's Dynamo fails an assertion when it resumes the block loop after a padded pruning block's
    # host read of the kept counts (a graph break); there the features run eagerly inside a compiled model.
    PrunedNaFlex.forward_features = torch.compiler.disable(PrunedNaFlex.forward_features)


# ----------------------------------------------------------------------------- adapter


class TimmAdapter:
    """The :class:`pruneattn.patch.registry.Adapter` of timm's families."""

    def encoder(self, family: Family, model: nn.Module) -> nn.Module:
        return model

    def has_class_token(self, family: Family, model: nn.Module) -> bool:
        return getattr(model, "cls_token", None) is not None or bool(getattr(model, "has_class_token", False))

    def reader(self, family: Family) -> TimmReader:
        return READER

    def pruned_block(self, shape: BlockShape, family: Family) -> type:
        return PrunedSequential if isinstance(shape, Sequential) else _PARALLEL[shape.block]

    def attach(self, family: Family, encoder: nn.Module, plan: Plan) -> None:
        """Swap the model's class (its forward opens the call's state) and its patch dropout's (which must
        report the patches it keeps)."""
        drop = getattr(encoder, "patch_drop", None)
        swaps = [(encoder, PrunedNaFlex if isinstance(encoder, NaFlexVit) else PrunedModel)]
        if isinstance(drop, (PatchDropout, PatchDropoutWithIndices)):
            swaps.append((drop, PrunedPatchDropout))
        for module, mixin in swaps:
            swap(module, mixin)
            module._pruneattn_plan = plan

    def check_block(self, family: Family, block: nn.Module, shape: BlockShape, layer: int) -> None:
        bad = [type(a).__name__ for a in _block_attentions(block)
               if not isinstance(block, ParallelScalingBlock) and not isinstance(a, _ATTENTIONS)]
        if bad:
            raise TypeError(
                f"pruneattn.patch: block {layer} is a {original_class(block).__name__} with attention {bad[0]}, "
                "which pruneattn cannot read; timm's Attention, EvaAttention and AttentionRope are supported"
            )
        rates = {READER.dropout(a) for a in _block_attentions(block)}
        if len(rates) > 1:
            raise ValueError(
                f"pruneattn.patch: block {layer}'s parallel attentions use different attention dropout rates "
                f"{sorted(rates)}, which one scoring attention over all their heads cannot apply; make them equal"
            )


ADAPTER = TimmAdapter()

