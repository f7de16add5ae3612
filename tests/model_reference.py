"""Independent eager reference of a pruned ViT forward, from the spec and ``pruneattn.reference`` only.

Written separately from ``pruneattn.patch``: plain (B, H, N, N) attention with
``reference.attention_probs``, scores with ``reference.received_attention`` / ``head_statistic``,
selection with ``reference.select_k``, and the multi-block fused-token rule spelled out with masks.
It reuses the model's own sub-modules (norms, Linears, MLPs) so that the weights are the same.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from pruneattn import reference


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for these tiny models: on a loaded 2-core machine, two threads spin-wait
    and a tiny forward can take seconds instead of milliseconds. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def kernel_device(device):
    """Where the Triton kernels run (conftest's ``device``), with TF32 off so fp32 can be held to 1e-4."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield device
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@dataclass
class BlockParts:
    """How to run one block in pieces (pre-norm, q/k/v, attention output branch, MLP branch)."""

    norm1: Callable[[torch.Tensor], torch.Tensor]
    qkv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    scale: float
    attn_out: Callable[[torch.Tensor], torch.Tensor]  # (B, N, H*d) merged heads -> residual branch
    mlp_branch: Callable[[torch.Tensor], torch.Tensor]


def timm_parts(blk) -> BlockParts:
    a = blk.attn

    def qkv(h):
        B, N, _ = h.shape
        q, k, v = a.qkv(h).reshape(B, N, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        return a.q_norm(q), a.k_norm(k), v

    return BlockParts(
        norm1=blk.norm1,
        qkv=qkv,
        scale=a.scale,
        attn_out=lambda o: blk.drop_path1(blk.ls1(a.proj_drop(a.proj(a.norm(o))))),
        mlp_branch=lambda x: blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x)))),
    )


def hf_parts(layer) -> BlockParts:
    a = layer.attention

    def qkv(h):
        B, N, _ = h.shape
        split = lambda t: t.reshape(B, N, -1, a.head_dim).permute(0, 2, 1, 3)  # noqa: E731
        return split(a.q_proj(h)), split(a.k_proj(h)), split(a.v_proj(h))

    return BlockParts(
        norm1=layer.layernorm_before,
        qkv=qkv,
        scale=a.scaling,
        attn_out=lambda o: layer.dropout(a.o_proj(o)),
        mlp_branch=lambda x: layer.dropout(layer.mlp(layer.layernorm_after(x))),
    )


@dataclass
class Trace:
    kept: dict[int, torch.Tensor]  # block -> (B, k) indices into the original patch grid
    tokens: list[int]  # token count after each block


def select(
    x: torch.Tensor, received: torch.Tensor, rate: float, p: int, fused: bool, stat: str, mode: str, detach: bool
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The spec's selection on tokens ``x`` (B, N, C) after an attention whose received attention per head
    is ``received`` (B, H, N): (kept tokens, kept patch indices (B, k), whether a fused token now ends x)."""
    B, N, _ = x.shape
    P = N - p - int(fused)
    if rate >= 1:
        return x, torch.arange(P, device=x.device).expand(B, P), fused
    num = max(1, math.ceil(round(rate * P, 9)))
    scores = reference.head_statistic(received[:, :, p : p + P], stat).float()  # float32 (spec)
    selected, idx = reference.select_k(x[:, : p + P], scores, num, p, None)
    parts_ = [selected]
    if mode == "fuse":
        # candidates of the fused token: the dropped patches and the old fused token
        w = received.mean(dim=1)[:, p:].float()  # (B, P [+ 1]), float32 like the scores
        w = w.detach() if detach else w
        dropped = torch.ones_like(w, dtype=torch.bool)
        dropped[:, :P] = dropped[:, :P].scatter(1, idx, False)
        w = torch.where(dropped, w, 0)
        w = w / w.sum(dim=1, keepdim=True)
        parts_.append((w.to(x.dtype).unsqueeze(-1) * x[:, p:]).sum(dim=1, keepdim=True))
    return torch.cat(parts_, dim=1), idx, fused or mode == "fuse"


def run_blocks(
    x: torch.Tensor,
    blocks,
    parts: Callable[[object], BlockParts],
    keep_rates: dict[int, float],
    *,
    num_prefix: int,
    stat: str = "var",
    query: str = "cls",
    mode: str = "drop",
    detach_fuse_weights: bool = False,
) -> tuple[torch.Tensor, Trace]:
    """Run ``blocks`` on tokens ``x``; blocks in ``keep_rates`` prune after their attention.

    ``detach_fuse_weights``: treat the fused token's weights as constants in the backward, as the
    core ``select_tokens`` does.
    """
    p = num_prefix
    fused = False
    grid = None
    trace = Trace({}, [])
    for i, blk in enumerate(blocks):
        if i not in keep_rates:
            x = blk(x)
            trace.tokens.append(x.shape[1])
            continue
        bp = parts(blk)
        B, N, _ = x.shape
        q, k, v = bp.qkv(bp.norm1(x))
        attn = reference.attention_probs(q, k, bp.scale)
        o = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        x = x + bp.attn_out(o)
        received = reference.received_attention(attn, query)  # (B, H, N)
        x, idx, fused = select(x, received, keep_rates[i], p, fused, stat, mode, detach_fuse_weights)
        grid = idx if grid is None else torch.gather(grid, 1, idx)
        trace.kept[i] = grid
        x = x + bp.mlp_branch(x)
        trace.tokens.append(x.shape[1])
    return x, trace


def timm_forward(model, images: torch.Tensor, keep_rates: dict[int, float], **kw) -> tuple[torch.Tensor, Trace]:
    """Logits of a timm VisionTransformer with the reference pruning."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    x, trace = run_blocks(x, model.blocks, timm_parts, keep_rates, num_prefix=model.num_prefix_tokens, **kw)
    return model.forward_head(model.norm(x)), trace


def hf_forward(backbone, images: torch.Tensor, keep_rates: dict[int, float], **kw) -> tuple[torch.Tensor, Trace]:
    """``last_hidden_state`` of a Hugging Face ViTModel / DeiTModel with the reference pruning."""
    x = backbone.embeddings(images)
    num_prefix = x.shape[1] - backbone.embeddings.patch_embeddings.num_patches
    x, trace = run_blocks(x, backbone.layers, hf_parts, keep_rates, num_prefix=num_prefix, **kw)
    return backbone.layernorm(x), trace


def token_counts(model, blocks) -> tuple[list[int], Callable[[], None]]:
    """Record the token count after each block of a real model (forward hooks); returns (list, remove)."""
    counts: list[int] = []
    hooks = [b.register_forward_hook(lambda m, i, out: counts.append(out.shape[1])) for b in blocks]
    return counts, lambda: [h.remove() for h in hooks]


# ----------------------------------------------------------------------------- every block in pieces
# For the model families whose non-pruning blocks also change after a pruning block (rotary tables
# that follow the kept patches), every block is run in pieces here, none through its own forward.


@dataclass
class Branch:
    """One attention of a block: its input, its q/k/v (before rotation) and its residual contribution."""

    pre: Callable[[torch.Tensor], torch.Tensor]  # x -> attention input h
    qkv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # h -> (B, H, N, d) each
    out: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (merged heads (B, N, H*d), h) -> branch


@dataclass
class Parts:
    branches: list[Branch]
    scale: float
    mlp: Callable[[torch.Tensor], torch.Tensor]  # x -> MLP residual branch
    parallel: bool = False  # the MLP reads the block input; selection after the whole block
    rotate_half: bool = False


def heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    B, N, _ = t.shape
    return t.reshape(B, N, -1, head_dim).permute(0, 2, 1, 3)


def rotary_for(table: torch.Tensor, grid: torch.Tensor | None) -> torch.Tensor:
    """The rotary table rows of the current patches, by plain indexing: (P, D) or (heads, P, D) in."""
    if grid is None:
        return table
    if table.dim() == 2:
        return table[grid].unsqueeze(1)  # (B, 1, P', D)
    return table[:, grid].permute(1, 0, 2, 3)  # (B, heads, P', D)


def run_by_parts(
    x: torch.Tensor,
    blocks,
    parts: Callable[[object], Parts],
    keep_rates: dict[int, float],
    *,
    num_prefix: int,
    rope: torch.Tensor | None = None,
    rope_per_block: bool = False,
    stat: str = "var",
    query: str = "cls",
    mode: str = "drop",
    detach_fuse_weights: bool = False,
    before_selection: dict[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, Trace]:
    """Run ``blocks`` in pieces; the blocks in ``keep_rates`` prune. ``rope``: the model's rotary table for
    the full grid (one per block with ``rope_per_block``); each block rotates the q and k of the patch
    tokens only (not the prefix, not a fused token) by the rows of their original grid positions."""
    from timm.layers import apply_rot_embed_cat

    p, fused, grid, trace = num_prefix, False, None, Trace({}, [])
    for i, blk in enumerate(blocks):
        bp = parts(blk)
        B, N, _ = x.shape
        P = N - p - int(fused)
        y, attns = x, []
        for br in bp.branches:
            h = br.pre(x)
            q, k, v = br.qkv(h)
            if rope is not None:
                t = rotary_for(rope[i] if rope_per_block else rope, grid)
                q, k = q.clone(), k.clone()
                q[:, :, p : p + P] = apply_rot_embed_cat(q[:, :, p : p + P], t, half=bp.rotate_half)
                k[:, :, p : p + P] = apply_rot_embed_cat(k[:, :, p : p + P], t, half=bp.rotate_half)
            attn = reference.attention_probs(q, k, bp.scale)
            y = y + br.out((attn @ v).transpose(1, 2).reshape(B, N, -1), h)
            attns.append(attn)
        if bp.parallel:
            y = y + bp.mlp(x)
        if i in keep_rates:
            if before_selection is not None:
                before_selection[i] = y
            received = reference.received_attention(torch.cat(attns, dim=1), query)
            y, idx, fused = select(y, received, keep_rates[i], p, fused, stat, mode, detach_fuse_weights)
            grid = idx if grid is None else torch.gather(grid, 1, idx)
            trace.kept[i] = grid
        x = y if bp.parallel else y + bp.mlp(y)
        trace.tokens.append(x.shape[1])
    return x, trace
