"""An independent reference for the vision-language models whose connector joins m x m windows (InternVL,
Gemma 3, Mistral 3, SmolVLM, Idefics3), written from the spec and the UNPATCHED model only.

- Which units each image (tile) keeps: the feature block's input from the unpatched tower
  (``output_hidden_states``), its attention by hand with eager softmax (the model's own norms, q / k
  projections, q / k norms and rotary table), each head's received attention (the class row, or the mean
  over the query rows) summed over each unit's m x m window of the raster grid, the population variance
  over heads of those sums, and the k best (ties to the lower unit), in raster order.
- What the language model reads: the unpatched model's own ``get_image_features`` on all units, the rows
  of the kept units (the connector reads the feature block's output, where everything after the attention
  is per token, and every connector here joins each window on its own).
- The prompt: the caller's prompt walked here, each tile's run of placeholders cut to its kept count
  (Mistral 3: the image's tokens laid out again as its processor lays out that many: rows of the image's
  width, ``[IMG_BREAK]`` between them, ``[IMG_END]`` last), padded on the left as the processors pad.
"""
from __future__ import annotations

import math

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.pixtral.modeling_pixtral import apply_rotary_pos_emb

from vlm_unit_models import BREAK, END, IMAGE_TOKEN, PATCH, SIDE, tower_of


def kept_count(units: int, amount: dict) -> int:
    """The spec's count: ``tokens`` (at most the units), or ceil(rate * units), at least 1."""
    if "tokens" in amount:
        return min(amount["tokens"], units)
    return max(1, math.ceil(round(amount["keep_rate"] * units, 9)))


def real_tiles(call: dict) -> torch.Tensor:
    """The tiles of a call (SmolVLM / Idefics3: the images of (prompts, slots, ...) that are not all zeros)."""
    pixels = call["pixel_values"]
    if pixels.dim() == 5:
        pixels = pixels.flatten(0, 1)
        pixels = pixels[(pixels != 0).flatten(1).any(1)]
    return pixels


def block_inputs(model, kind: str, call: dict, block: int) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """Each tower image's input to ``block`` (tokens, C) and its patch grid, from the unpatched tower."""
    tower = tower_of(model)
    if kind == "mistral3":
        hidden = tower(call["pixel_values"], image_sizes=call["image_sizes"], output_hidden_states=True)
        grids = [(h // PATCH, w // PATCH) for h, w in call["image_sizes"].tolist()]
        return list(zip(hidden.hidden_states[block][0].split([h * w for h, w in grids]), grids))
    pixels = real_tiles(call)
    side = pixels.shape[-1] // PATCH
    return [(x, (side, side)) for x in tower(pixel_values=pixels, output_hidden_states=True).hidden_states[block]]


def attention(model, kind: str, block: int, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(H, N, N): the block's attention weights by hand (eager softmax)."""
    tower = tower_of(model)
    if kind == "internvl":
        layer = tower.encoder.layer[block]
        att, h = layer.attention, layer.layernorm_before(x[None])
        q, k, scale = att.q_norm(att.q_proj(h)), att.k_norm(att.k_proj(h)), att.scale
    elif kind == "mistral3":
        layer = tower.transformer.layers[block]
        att, h = layer.attention, layer.attention_norm(x[None])
        q, k, scale = att.q_proj(h), att.k_proj(h), att.scaling
    else:
        layer = tower.encoder.layers[block]
        att, h = layer.self_attn, layer.layer_norm1(x[None])
        q, k, scale = att.q_proj(h), att.k_proj(h), att.scale
    heads = att.num_heads
    q, k = (t.view(1, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k))
    if kind == "mistral3":
        rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
        cos, sin = tower.patch_positional_embedding(h, torch.stack([rows.flatten(), cols.flatten()], dim=-1))
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=0)
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)[0]


def best_units(A: torch.Tensor, grid: tuple[int, int], m: int, prefix: int, count: int) -> torch.Tensor:
    """The ``count`` units (raster indices of the unit grid, ascending) of highest score."""
    H = A.shape[0]
    received = A[:, 0, prefix:] if prefix else A[:, :, prefix:].mean(1)  # (H, P): class row, or mean over queries
    h, w = grid
    units = received.reshape(H, h // m, m, w // m, m).sum(dim=(2, 4)).flatten(1)  # (H, U), raster unit order
    score = units.var(dim=0, unbiased=False)
    order = torch.sort(score, descending=True, stable=True).indices  # ties: lower unit first
    return order[:count].sort().values


def patches_of(units: torch.Tensor, grid: tuple[int, int], m: int) -> torch.Tensor:
    """The patches (raster indices) of ``units``, ascending."""
    w = grid[1]
    row, col = units // (w // m), units % (w // m)
    dy, dx = torch.meshgrid(torch.arange(m), torch.arange(m), indexing="ij")
    return ((row[:, None] * m + dy.flatten()) * w + col[:, None] * m + dx.flatten()).flatten().sort().values


def feature_block(model) -> int:
    """The tower block whose output the connector reads (InternVL: ``vision_feature_layer``; else the last)."""
    depth = tower_of(model).config.num_hidden_layers
    return getattr(model.config, "vision_feature_layer", -1) % (depth + 1) - 1


def reference_units(model, kind: str, call: dict, amount: dict) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """Each tower image's kept units and its patch grid, chosen in the feature block."""
    block = feature_block(model)
    m, prefix = SIDE[kind], int(kind == "internvl")
    out = []
    with torch.no_grad():
        for x, grid in block_inputs(model, kind, call, block):
            units = grid[0] * grid[1] // (m * m)
            out.append((best_units(attention(model, kind, block, x, grid), grid, m, prefix, kept_count(units, amount)),
                        grid))
    return out


def reference_features(
    model, kind: str, call: dict, kept: list[torch.Tensor], grad: bool = False
) -> BaseModelOutputWithPooling:
    """What the unpatched model's connector gives the kept units (as ``mm_encoder_outputs["image"]``)."""
    base = model.model
    with torch.set_grad_enabled(grad):
        if kind == "mistral3":
            full = base.get_image_features(call["pixel_values"], image_sizes=call["image_sizes"]).pooler_output
            return BaseModelOutputWithPooling(pooler_output=tuple(f[k] for f, k in zip(full, kept)))
        if kind in ("smolvlm", "idefics3"):
            full = base.get_image_features(call["pixel_values"], call.get("pixel_attention_mask")).pooler_output
            rows, start = [], 0
            for f in full:  # one per prompt: its tiles' units one after another
                per_tile = f.view(-1, 16, f.shape[-1])
                rows.append(torch.cat([t[k] for t, k in zip(per_tile, kept[start : start + len(per_tile)])]))
                start += len(per_tile)
            return BaseModelOutputWithPooling(pooler_output=rows)
        full = base.get_image_features(pixel_values=call["pixel_values"]).pooler_output
        return BaseModelOutputWithPooling(pooler_output=torch.stack([f[k] for f, k in zip(full, kept)]))


def _rows_layout(count: int, width: int) -> list[int]:
    """Mistral 3's processor layout of ``count`` placeholders in rows of ``width``."""
    out = []
    while count:
        n = min(width, count)
        count -= n
        out += [IMAGE_TOKEN["mistral3"]] * n + [BREAK if count else END]
    return out


def short_prompt(kind: str, call: dict, kept: list[tuple[torch.Tensor, tuple[int, int]]]) -> dict:
    """The caller's prompt with each tile's placeholders cut to its kept count (see the module docstring),
    padded on the left; Gemma 3 with its token types (1 at image tokens)."""
    image, m = IMAGE_TOKEN[kind], SIDE[kind]
    counts = [len(k) for k, _ in kept]
    rows, t = [], 0
    for ids, mask in zip(call["input_ids"].tolist(), call["attention_mask"].tolist()):
        ids = [i for i, real in zip(ids, mask) if real]
        out, j = [], 0
        while j < len(ids):
            if ids[j] != image:
                out.append(ids[j])
                j += 1
            elif kind == "mistral3":  # the image's tokens up to its [IMG_END], laid out again
                end = ids.index(END, j)
                out += _rows_layout(counts[t], kept[t][1][1] // m)
                t, j = t + 1, end + 1
            else:  # a run of whole tiles of 16 placeholders
                n = next((r for r in range(j, len(ids)) if ids[r] != image), len(ids)) - j
                for _ in range(n // 16):
                    out += [image] * counts[t]
                    t += 1
                j += n
        rows.append(out)
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    short = {"input_ids": ids, "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])}
    if kind == "gemma3":
        short["token_type_ids"] = (ids == image).long()
    return short
