"""Qwen2.5-VL patched: its language model reads only the kept merged units, at their own M-RoPE positions.

The truth is written here from the UNPATCHED model: the kept units of each image from its tower's last
block recomputed by hand (the block's input captured by a hook, q / k / v from its own weights, plain
softmax over the image, received attention averaged over the image's queries and summed per 2 x 2
unit, variance over heads, top-k with ties to the lower index); the unpatched model's own
language-model inputs for the full prompt (its image features scattered into the placeholders, its
``get_rope_index`` positions) minus the dropped units' positions, left-padded again; greedy decoding
continued by hand at each row's largest position + 1. Random weights from configs.
"""
import copy
import math

import pytest
import torch

import pruneattn
from model_reference import one_thread  # noqa: F401  (fixture)

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.vision_utils import get_vision_window_index  # noqa: E402

pytestmark = pytest.mark.usefixtures("cpu_backend")  # float64 truth: the CPU path (the kernels: below)

IMG, VS, VE, VIDEO, PAD = 90, 91, 92, 93, 0
PATCH, MERGE = 4, 2


KINDS = ["qwen2.5-vl", "qwen2-vl"]


def _model(kind, seed=0):
    torch.manual_seed(seed)
    text = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    tokens = dict(image_token_id=IMG, video_token_id=VIDEO, vision_start_token_id=VS, vision_end_token_id=VE)
    if kind == "qwen2.5-vl":
        vision = dict(depth=4, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=64, patch_size=PATCH,
                      window_size=16, fullatt_block_indexes=[1, 3], temporal_patch_size=2, spatial_merge_size=MERGE)
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens))
    else:  # no windows: every block attends over the whole image
        vision = dict(depth=4, embed_dim=64, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=PATCH,
                      temporal_patch_size=2, spatial_merge_size=MERGE)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **tokens))
    model = model.eval().double()
    with torch.no_grad():
        for block in model.model.visual.blocks:
            block.attn.qkv.weight[:128].mul_(3.0)  # q and k rows: scores that differ
    return model


def _batch(prompts, grids):
    """What the processor gives: left-padded ids with one placeholder per merged unit of each image,
    the attention mask, token types, the images' patches and grids. ``prompts``: per row, a list of
    text token lists and image indices."""
    units = [t * h * w // (MERGE * MERGE) for t, h, w in grids]
    rows = []
    for parts in prompts:
        row = []
        for p in parts:
            row += [VS] + [IMG] * units[p] + [VE] if isinstance(p, int) else p
        rows.append(row)
    L = max(map(len, rows))
    ids = torch.tensor([[PAD] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), 3 * 2 * PATCH * PATCH, generator=g, dtype=torch.float64)
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == IMG).int(), pixel_values=pixels,
                image_grid_thw=torch.tensor(grids))


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _kept_units(model, batch, rate):
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
        n = cu[i + 1] - cu[i]
        a = block.attn
        with torch.no_grad():
            q, k, _ = a.qkv(block.norm1(x[rows])).view(n, 3, a.num_heads, -1).permute(1, 2, 0, 3)
            c, s = cos[rows].float(), sin[rows].float()
            q, k = ((u.float() * c + _rotate_half(u.float()) * s).double() for u in (q, k))
            attn = torch.softmax(q @ k.transpose(-1, -2) * a.scaling, dim=-1)
        per_unit = attn.mean(dim=1).view(a.num_heads, n // 4, 4).sum(-1)
        score = (per_unit - per_unit.mean(0)).square().mean(0)
        units = n // 4
        k_units = min(rate, units) if isinstance(rate, int) else max(1, math.ceil(round(rate * units, 9)))
        best = sorted(range(units), key=lambda u: (-float(score[u]), u))[:k_units]
        if getattr(tower, "window_size", None) is None:  # Qwen2-VL: units in raster order
            order = torch.arange(units)
        else:
            order, _ = get_vision_window_index(torch.tensor([[t, h, w]]), MERGE, tower.window_size, PATCH)
        kept.append(sorted(int(order[u]) for u in best))
    return kept


def _reference_inputs(model, batch, kept):
    """The unpatched model's language-model inputs for the full prompt, minus the dropped units."""
    base = model.model
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids)
        feats = torch.cat(base.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output)
        embeds = embeds.masked_scatter((ids == IMG)[..., None], feats)
    pos, _ = base.get_rope_index(ids, batch["mm_token_type_ids"], image_grid_thw=batch["image_grid_thw"],
                                 attention_mask=mask)
    units = [t * h * w // 4 for t, h, w in batch["image_grid_thw"].tolist()]
    image = 0
    rows = []
    for b in range(ids.shape[0]):
        keep, j = [], 0
        while j < ids.shape[1]:
            if not mask[b, j]:
                j += 1
                continue
            if ids[b, j] == IMG:
                keep += [j + u for u in kept[image]]
                j += units[image]
                image += 1
                continue
            keep.append(j)
            j += 1
        rows.append(keep)
    L = max(map(len, rows))
    out_embeds = torch.zeros(len(rows), L, embeds.shape[-1], dtype=embeds.dtype)
    out_pos = torch.ones(3, len(rows), L, dtype=torch.long)
    out_mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, keep in enumerate(rows):
        out_embeds[b, L - len(keep):] = embeds[b, keep]
        out_pos[:, b, L - len(keep):] = pos[:, b, keep]
        out_mask[b, L - len(keep):] = 1
    return out_embeds, out_pos, out_mask, rows


def _reference_logits(model, embeds, pos, mask):
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=embeds, position_ids=pos, attention_mask=mask).last_hidden_state
        return model.lm_head(hidden)


def _reference_greedy(model, embeds, pos, mask, steps):
    """Greedy decoding by hand: each new token at its row's largest position + 1, then + 1 per step."""
    lm = model.model.language_model
    out = []
    with torch.no_grad():
        res = lm(inputs_embeds=embeds, position_ids=pos, attention_mask=mask, use_cache=True)
        cache = res.cache
        nxt = model.lm_head(res.last_hidden_state[:, -1]).argmax(-1)
        position = pos.masked_fill(mask[None] == 0, -1).amax(dim=(0, 2)) + 1
        for _ in range(steps):
            out.append(nxt)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            p = position.view(1, -1, 1).expand(3, -1, 1)
            res = lm(inputs_embeds=lm.embed_tokens(nxt[:, None]), position_ids=p, attention_mask=mask, cache=cache,
                     use_cache=True)
            cache, position = res.cache, position + 1
            nxt = model.lm_head(res.last_hidden_state[:, -1]).argmax(-1)
    return torch.stack(out, dim=1)


GRIDS = [(1, 8, 12), (1, 4, 4), (1, 6, 4)]
PROMPTS = [[[5, 6, 7], 0, [8, 9]], [[5], 1, [10], 2, [8, 9, 10, 11]]]  # row 1: two images of different sizes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("amount", [0.25, 0.5, 3], ids=["rate0.25", "rate0.5", "tokens3"])
def test_logits_kept_units_and_greedy_tokens_match_the_reference(amount, kind):
    model = _model(kind)
    batch = _batch(PROMPTS, GRIDS)
    kept = _kept_units(model, batch, amount)
    embeds, pos, mask, rows = _reference_inputs(model, batch, kept)
    want = _reference_logits(model, embeds, pos, mask)
    greedy = _reference_greedy(model, embeds, pos, mask, steps=4)
    unpatched = copy.deepcopy(model)
    pruneattn.patch(model, **({"tokens": amount} if isinstance(amount, int) else {"keep_rate": amount}))
    with torch.no_grad():
        got = model(**batch)
    assert got.logits.shape[:2] == mask.shape
    real = mask.bool()
    torch.testing.assert_close(got.logits[real], want[real], rtol=1e-9, atol=1e-9)
    found = pruneattn.kept_indices(model)[3]
    assert [[int(u) for u in r if u >= 0] for r in found] == kept
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    L = batch["input_ids"].shape[1]
    assert torch.equal(out[:, :L], batch["input_ids"])
    assert torch.equal(out[:, L:], greedy)
    # the unpatched model itself is untouched by all of this
    with torch.no_grad():
        ref_full = unpatched(**batch)
    assert ref_full.logits.shape[1] == L


@pytest.mark.parametrize("kind", KINDS)
def test_keep_all_equals_unpatched(kind):
    model = _model(kind)
    batch = _batch(PROMPTS, GRIDS)
    with torch.no_grad():
        want = model(**batch).logits
        want_gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
        pruneattn.patch(model, keep_rate=1.0)
        got = model(**batch).logits
        got_gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-10, atol=1e-10)
    assert torch.equal(got_gen, want_gen)


@pytest.mark.parametrize("kind", KINDS)
def test_labels_base_model_and_refusals(kind):
    model = _model(kind)
    batch = _batch(PROMPTS, GRIDS)
    kept = _kept_units(model, batch, 0.5)
    embeds, pos, mask, rows = _reference_inputs(model, batch, kept)
    want = _reference_logits(model, embeds, pos, mask)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    short_labels = torch.full(mask.shape, -100)
    for b, keep in enumerate(rows):
        short_labels[b, mask.shape[1] - len(keep):] = labels[b, keep]
    want_loss = model.loss_function(logits=want, labels=short_labels, vocab_size=100)
    pruneattn.patch(model, keep_rate=0.5)
    with torch.no_grad():
        got = model(**batch, labels=labels)
        hidden = model.model(**batch).last_hidden_state  # the base model called directly is pruned too
    torch.testing.assert_close(got.loss, want_loss, rtol=1e-9, atol=1e-9)
    assert hidden.shape[1] == mask.shape[1]
    with pytest.raises(ValueError, match="videos"):
        model(**batch, pixel_values_videos=batch["pixel_values"], video_grid_thw=batch["image_grid_thw"])
    if kind == "qwen2.5-vl":
        with pytest.raises(ValueError, match="full-attention blocks"):
            pruneattn.patch(model, layers=[2])
    with pytest.raises(ValueError, match="mode='fuse'"):
        pruneattn.patch(model, mode="fuse")


def test_text_only_prompt_is_unchanged():
    model = _model("qwen2.5-vl")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        pruneattn.patch(model, keep_rate=0.5)
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want)


def test_qwen3_vl_is_refused_with_its_reason():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=64,
                           deepstack_visual_indexes=[0], num_position_embeddings=64),
    )
    model = Qwen3VLForConditionalGeneration(cfg)
    for part in (model, model.model):
        with pytest.raises(TypeError, match=f"does not support {type(part).__name__}: its .*DeepStack.*model.visual"):
            pruneattn.patch(part)
    assert not any(type(m).__name__.startswith("Pruned") for m in model.modules())
    pruneattn.patch(model.model.visual)  # the tower alone prunes (tests/test_families_qwen3_glm_towers.py)


def test_prompts_that_do_not_fit_their_images_are_refused_before_any_work():
    model = _model("qwen2.5-vl")
    batch = _batch(PROMPTS, GRIDS)
    pruneattn.patch(model, keep_rate=0.5)
    ran = []
    model.model.visual.register_forward_pre_hook(lambda *a: ran.append(1))
    short = {**batch, "input_ids": batch["input_ids"].masked_fill(batch["input_ids"] == IMG, 5)}
    short["input_ids"][0, -3] = IMG  # one placeholder where the images make 24 + 4 + 6
    with pytest.raises(ValueError, match="hold 1 image tokens; their 3 images take 34 .* or 17"):
        model(**short)
    with pytest.raises(ValueError, match="image_grid_thw"):
        model(**{k: v for k, v in batch.items() if k != "image_grid_thw"})
    assert not ran
