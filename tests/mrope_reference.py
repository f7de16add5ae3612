"""Independent references for the M-RoPE vision-language models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL and -MoE,
Qwen3.5 and -MoE, GLM-4.1V / 4.5V / 4.6V), written from the UNPATCHED model and the spec, not from
``pruneattn.patch``:

- :func:`kept_units`: each image's kept units by the tower's last block, computed by hand (the block's
  input captured by a hook, q / k / v from its own weights, plain softmax over the image, the spec's unit
  score, top-k with ties to the lower index; merged_reference.py);
- :func:`reference_inputs`: the unpatched model's own language-model inputs for the full prompt (its image
  features, and Qwen3-VL's DeepStack features, scattered into the placeholders; its ``get_rope_index``
  positions) with the dropped units' rows removed, left-padded again;
- :func:`reference_logits` / :func:`reference_greedy`: the unpatched language model on them, greedy
  decoding continued by hand at each row's largest position + 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from merged_reference import block_attention, top_units

PATCH, MERGE, UNIT = 4, 2, 4  # the test towers: 4 px patches, 2 x 2 merged units


def prompt(prompts: list[list], grids: list[tuple[int, int, int]], image: int, start: int, end: int,
           pad: int = 0, seed: int = 3) -> dict:
    """What the processor gives: left-padded ids with one placeholder per merged unit of each image between
    ``start`` and ``end``, the attention mask, token types, the images' patches (float64) and grids.
    ``prompts``: per row, a list of text token lists and image indices."""
    units = [t * h * w // UNIT for t, h, w in grids]
    rows = []
    for parts in prompts:
        row = []
        for p in parts:
            row += [start] + [image] * units[p] + [end] if isinstance(p, int) else p
        rows.append(row)
    L = max(map(len, rows))
    ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), 3 * 2 * PATCH * PATCH, generator=g, dtype=torch.float64)
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == image).int(), pixel_values=pixels,
                image_grid_thw=torch.tensor(grids))


def kept_units(model, batch: dict, rate: float | int) -> list[list[int]]:
    """Per image, its kept units (raster indices) by the tower's last block, computed by hand."""
    tower = model.model.visual
    block = tower.blocks[-1]
    seen = {}
    handle = block.register_forward_pre_hook(lambda m, a, kw: seen.update(x=a[0], **kw), with_kwargs=True)
    with torch.no_grad():
        tower(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    handle.remove()
    x, cu, (cos, sin) = seen["x"], seen["cu_seqlens"].tolist(), seen["position_embeddings"]
    kept = []
    for i, (t, h, w) in enumerate(batch["image_grid_thw"].tolist()):
        rows = slice(cu[i], cu[i + 1])
        with torch.no_grad():
            attn, _ = block_attention(block, x[rows], cos[rows], sin[rows])
        best = top_units(attn, UNIT, rate)
        units = (cu[i + 1] - cu[i]) // UNIT
        if getattr(tower, "window_size", None) is None:  # units in raster order
            order = torch.arange(units)
        else:  # Qwen2.5-VL: the tower holds its units window by window
            from transformers.vision_utils import get_vision_window_index

            order, _ = get_vision_window_index(torch.tensor([[t, h, w]]), MERGE, tower.window_size, PATCH)
        kept.append(sorted(int(order[u]) for u in best))
    return kept


@dataclass
class Reference:
    """The unpatched language model's inputs for the kept tokens, left-padded."""

    embeds: torch.Tensor  # (B, L', C)
    positions: torch.Tensor  # (3, B, L'): the full prompt's (t, h, w) ids of the kept tokens (1 at padding)
    mask: torch.Tensor  # (B, L')
    rows: list[list[int]]  # per row, the caller positions kept, in order
    image: torch.Tensor  # (B, L') bool: the kept image tokens
    deepstack: list[torch.Tensor]  # Qwen3-VL: per DeepStack level, the rows of the kept image tokens in order

    def language_model_inputs(self) -> dict:
        out = dict(inputs_embeds=self.embeds, position_ids=self.positions, attention_mask=self.mask)
        if self.deepstack:
            out.update(visual_pos_masks=self.image, deepstack_visual_embeds=self.deepstack)
        return out

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The caller's ``labels`` (B, L) at the kept positions, -100 at the padding."""
        out = torch.full(self.mask.shape, -100)
        for b, keep in enumerate(self.rows):
            out[b, self.mask.shape[1] - len(keep):] = labels[b, keep]
        return out


def reference_inputs(model, batch: dict, kept: list[list[int]]) -> Reference:
    """The unpatched model's language-model inputs for the full prompt ``batch``, minus the units not in
    ``kept`` (differentiable in the model's weights)."""
    base = model.model
    ids, mask = batch["input_ids"], batch["attention_mask"]
    is_image = (ids == model.config.image_token_id)[..., None]
    features = base.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    embeds = base.get_input_embeddings()(ids).masked_scatter(is_image, torch.cat(features.pooler_output))
    levels = [torch.zeros(*ids.shape, f[0].shape[-1], dtype=f[0].dtype).masked_scatter(is_image, torch.cat(f))
              for f in (features.get("deepstack_features") or [])]
    pos, _ = base.get_rope_index(ids, batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
                                 attention_mask=mask)
    units = [t * h * w // UNIT for t, h, w in batch["image_grid_thw"].tolist()]
    image, rows = 0, []
    for b in range(ids.shape[0]):
        keep, j = [], 0
        while j < ids.shape[1]:
            if not mask[b, j]:
                j += 1
            elif is_image[b, j, 0]:
                keep += [j + u for u in kept[image]]
                j += units[image]
                image += 1
            else:
                keep.append(j)
                j += 1
        rows.append(keep)
    L = max(map(len, rows))
    index = torch.tensor([[r[0]] * (L - len(r)) + r for r in rows])  # the padding repeats a real row, masked out
    real = torch.tensor([[False] * (L - len(r)) + [True] * len(r) for r in rows])
    take = index[..., None].expand(-1, -1, embeds.shape[-1])
    image_kept = is_image[..., 0].gather(1, index) & real
    return Reference(
        embeds=embeds.gather(1, take).masked_fill(~real[..., None], 0.0),
        positions=pos.gather(2, index[None].expand(3, -1, -1)).masked_fill(~real[None], 1),
        mask=real.long(), rows=rows, image=image_kept,
        deepstack=[level.gather(1, take)[image_kept] for level in levels],
    )


def reference_logits(model, ref: Reference) -> torch.Tensor:
    hidden = model.model.language_model(**ref.language_model_inputs()).last_hidden_state
    return model.lm_head(hidden)


@torch.no_grad()
def reference_greedy(model, ref: Reference, steps: int) -> torch.Tensor:
    """Greedy decoding by hand: each new token at its row's largest position + 1, then + 1 per step."""
    lm = model.model.language_model
    mask, out = ref.mask, []
    res = lm(**ref.language_model_inputs(), use_cache=True)
    cache = res.cache
    nxt = model.lm_head(res.last_hidden_state[:, -1]).argmax(-1)
    position = ref.positions.masked_fill(mask[None] == 0, -1).amax(dim=(0, 2)) + 1
    for _ in range(steps):
        out.append(nxt)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        p = position.view(1, -1, 1).expand(3, -1, 1)
        res = lm(inputs_embeds=lm.embed_tokens(nxt[:, None]), position_ids=p, attention_mask=mask, cache=cache,
                 use_cache=True)
        cache, position = res.cache, position + 1
        nxt = model.lm_head(res.last_hidden_state[:, -1]).argmax(-1)
    return torch.stack(out, dim=1)
