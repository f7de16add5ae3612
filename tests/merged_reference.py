"""Independent eager reference of a pruned vision tower that merges units (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
Qwen3.5, GLM-4.xV), for ONE image alone, written from the spec and not from ``pruneattn.patch``.

Per block: plain softmax attention over the image's remaining tokens (within each token's window in
a window-attention block), with the tower's rotary tables applied by hand at each token's original
position (in float32, as the towers rotate); in each pruning block the unit score of the spec (the
attention received by each token averaged over the image's queries, summed over the unit's tokens,
variance over heads), k whole units with ties to the lower index, in their order; then the MLP on
the kept tokens. The tower's own sub-modules (norms, projections, MLPs, mergers) give the weights.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch


def pixels(grids, channels: int, dtype=torch.float64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flattened patches for images of ``grids`` (t, h, w) with ``channels`` values each, and the grid."""
    g = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, channels, generator=g, dtype=torch.float64).to(dtype), torch.tensor(grids)


def sharpened(tower):
    """``tower`` with the q and k rows of every block's fused projection scaled by 3, so that the attention
    is far from uniform and the unit scores differ (random weights alone give near ties)."""
    with torch.no_grad():
        for block in tower.blocks:
            block.attn.qkv.weight[: 2 * block.attn.qkv.in_features].mul_(3.0)
    return tower


def padded(rows: list[list[int]]) -> torch.Tensor:
    """Rows of different lengths as one tensor, padded with -1 (as ``kept_indices`` pads)."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def kept_count(rate: float | int, units: int) -> int:
    """A keep rate: ceil(rate * units); an int: ``tokens=`` that many units at most."""
    return min(rate, units) if isinstance(rate, int) else max(1, math.ceil(round(rate * units, 9)))


def block_attention(block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    same_window: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention weights (H, n, n) of ``block`` over one image's tokens ``x`` (n, C), q and k rotated by
    the rotary tables ``cos`` / ``sin`` (n, d) in float32 (as the towers rotate, whatever their dtype), plain
    softmax (keys outside ``same_window`` (n, n) excluded), and its values (H, n, d)."""
    a = block.attn
    n = x.shape[0]
    q, k, v = a.qkv(block.norm1(x)).view(n, 3, a.num_heads, -1).permute(1, 2, 0, 3)  # (H, n, d) each
    c, s = cos.float(), sin.float()
    q, k = ((t.float() * c + _rotate_half(t.float()) * s).to(t.dtype) for t in (q, k))
    logits = q @ k.transpose(-1, -2) * a.scaling
    if same_window is not None:
        logits = logits.masked_fill(~same_window, float("-inf"))
    return torch.softmax(logits, dim=-1), v


def top_units(attn: torch.Tensor, unit: int, rate: float | int, stat: str = "var") -> list[int]:
    """The spec's kept units of one image from its attention weights (H, n, n): the attention each token
    receives averaged over the image's queries, summed over each unit's ``unit`` tokens, the statistic over
    heads; the ``kept_count`` best, ties to the lower index, ascending."""
    received = attn.mean(dim=1)  # (H, n)
    per_unit = received.view(received.shape[0], -1, unit).sum(dim=-1)
    centred = per_unit - per_unit.mean(dim=0)
    score = (centred * centred).mean(dim=0) if stat == "var" else per_unit.mean(dim=0)
    units = per_unit.shape[1]
    return sorted(sorted(range(units), key=lambda u: (-float(score[u]), u))[: kept_count(rate, units)])


def pruned_blocks(
    tower, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], rates: dict, unit: int,
    window_of: torch.Tensor | None = None, full=None, stat: str = "var",
    after: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[int, list[int]]]:
    """The tower's blocks on one image's tokens ``x`` (T, C), pruning in the blocks of ``rates``
    ({block: keep rate or tokens}). ``window_of``: each token's window, used by the blocks not in
    ``full``; None: every block attends over the whole image. ``after(i, x, rows)`` sees each block's
    output. Returns the tokens left, their input positions, and {block: kept units (input unit
    positions, ascending)}."""
    cos, sin = rope
    rows = torch.arange(x.shape[0])  # input position of each current token
    kept = {}
    for i, block in enumerate(tower.blocks):
        n = rows.numel()
        same = None
        if window_of is not None and i not in full:
            same = window_of[rows][:, None] == window_of[rows][None, :]
        attn, v = block_attention(block, x, cos[rows], sin[rows], same)
        x = x + block.attn.proj((attn @ v).transpose(0, 1).reshape(n, -1))
        if i in rates:
            best = top_units(attn, unit, rates[i], stat)
            take = torch.tensor([u * unit + j for u in best for j in range(unit)])
            x, rows = x[take], rows[take]
            kept[i] = (rows[::unit] // unit).tolist()
        x = x + block.mlp(block.norm2(x))
        if after is not None:
            after(i, x, rows)
    return x, rows, kept


@torch.no_grad()
def each_frame_alone(run: Callable, pixels: torch.Tensor, grids) -> tuple[torch.Tensor, list, dict]:
    """``run(pixels, h, w)`` -> (merged rows, [extra features], {block: kept units}) on each frame alone;
    the merged rows and each extra feature concatenated over the frames in order, and per block the
    kept units of each frame."""
    out, extras, kept, start = [], [], {}, 0
    for h, w in [(h, w) for t, h, w in grids for _ in range(t)]:
        merged, extra, k = run(pixels[start : start + h * w], h, w)
        start += h * w
        out.append(merged)
        extras.append(extra)
        for layer, units in k.items():
            kept.setdefault(layer, []).append(units)
    return torch.cat(out), [torch.cat(f) for f in zip(*extras)], kept


def checkpointed_grads(tower, loss: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
    """The gradient of the first block's fused q / k / v weight from ``loss()`` in training mode, without
    and then with transformers' activation checkpointing (non-reentrant)."""
    tower.train()
    grads = []
    for checkpointing in (False, True):
        tower.zero_grad()
        if checkpointing:
            tower.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        loss().backward()
        grads.append(tower.blocks[0].attn.qkv.weight.grad.clone())
    return grads
