"""Qwen2.5-VL patched: its language model reads only the kept merged units, at their own M-RoPE positions.

The truth is written from the UNPATCHED model (mrope_reference.py): the kept units of each image from
its tower's last block recomputed by hand (q / k / v from its own weights, plain softmax over the image,
received attention averaged over the image's queries and summed per 2 x 2 unit, variance over heads,
top-k with ties to the lower index); the unpatched model's own language-model inputs for the full prompt
(its image features scattered into the placeholders, its ``get_rope_index`` positions) minus the dropped
units' positions, left-padded again; greedy decoding continued by hand at each row's largest position
+ 1. Random weights from configs.
"""
import copy

import pytest
import torch

import pruneattn
from model_reference import one_thread  # noqa: F401  (fixture)
from mrope_reference import MERGE, PATCH, kept_units, prompt, reference_greedy, reference_inputs, reference_logits

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

pytestmark = pytest.mark.usefixtures("cpu_backend")  # float64 truth: the CPU path (the kernels: below)

IMG, VS, VE, VIDEO, PAD = 90, 91, 92, 93, 0


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
    return prompt(prompts, grids, IMG, VS, VE, PAD)


GRIDS = [(1, 8, 12), (1, 4, 4), (1, 6, 4)]
PROMPTS = [[[5, 6, 7], 0, [8, 9]], [[5], 1, [10], 2, [8, 9, 10, 11]]]  # row 1: two images of different sizes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("amount", [0.25, 0.5, 3], ids=["rate0.25", "rate0.5", "tokens3"])
def test_logits_kept_units_and_greedy_tokens_match_the_reference(amount, kind):
    model = _model(kind)
    batch = _batch(PROMPTS, GRIDS)
    kept = kept_units(model, batch, amount)
    with torch.no_grad():
        ref = reference_inputs(model, batch, kept)
        want = reference_logits(model, ref)
    greedy = reference_greedy(model, ref, steps=4)
    mask = ref.mask
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
    kept = kept_units(model, batch, 0.5)
    with torch.no_grad():
        ref = reference_inputs(model, batch, kept)
        want = reference_logits(model, ref)
    mask = ref.mask
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    want_loss = model.loss_function(logits=want, labels=ref.labels(labels), vocab_size=100)
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
