"""Vision-language models whose connector joins m x m windows of patches into one token (InternVL's pixel
shuffle, Gemma 3's 4 x 4 average pool, Mistral 3's patch merger, Idefics3 / SmolVLM's pixel shuffle): the
patched model against the reference of ``tests/unit_reference.py``, written from the unpatched model.

Each test feeds the patched model the processor's own (full) prompt; the reference is the unpatched model
fed a prompt walked here with each tile's kept count of placeholders and, in place of the images, its own
connector's features of the units chosen here by the spec's score.
"""
from __future__ import annotations

import copy

import pytest
import torch

import pruneattn
from model_reference import one_thread  # noqa: F401 (fixture)
from unit_reference import feature_block, patches_of, reference_features, reference_units, short_prompt
from vlm_processors import case, inputs
from vlm_unit_models import IMAGE_TOKEN, SIDE, UNIT_KINDS, tower_of

pytestmark = pytest.mark.usefixtures("cpu_backend")
AMOUNTS = [{"tokens": 5}, {"keep_rate": 0.3}]


def _patched(kind: str, amount: dict, model=None):
    """The model of ``kind`` (or ``model``) patched with ``amount``, an unpatched copy, the processor's call."""
    built, processor, texts, pictures = case(kind)
    model = built if model is None else model
    call = inputs(processor, texts, pictures)
    ref = copy.deepcopy(model)
    pruneattn.patch(model, **amount)
    return model, ref, call


def _reference(ref, kind: str, call: dict, amount: dict, **extra):
    kept = reference_units(ref, kind, call, amount)
    short = short_prompt(kind, call, kept)
    features = reference_features(ref, kind, call, [k for k, _ in kept])
    with torch.no_grad():
        want = ref(**short, mm_encoder_outputs={"image": features}, **extra)
    return want, short, kept


def compare_with_reference(kind: str, amount: dict, model=None, tolerance: float = 1e-5) -> tuple:
    """The patched model's logits (the processor's prompt) against the reference's at every real position;
    returns the patched model and the reference's kept units."""
    model, ref, call = _patched(kind, amount, model)
    with torch.no_grad():
        got = model(**call)
    want, short, kept = _reference(ref, kind, call, amount)
    assert got.logits.shape == want.logits.shape  # the prompt the processor would write for the kept count
    real = short["attention_mask"].bool()
    torch.testing.assert_close(got.logits[real], want.logits[real], rtol=tolerance, atol=tolerance)
    return model, kept


@pytest.mark.parametrize("amount", AMOUNTS, ids=["tokens5", "rate0.3"])
@pytest.mark.parametrize("kind", UNIT_KINDS)
def test_logits_and_kept_units_match_the_reference(kind, amount):
    model, kept = compare_with_reference(kind, amount)
    block = feature_block(model)
    expect = [patches_of(k, grid, SIDE[kind]) for k, grid in kept]
    expect = torch.nn.utils.rnn.pad_sequence(expect, batch_first=True, padding_value=-1)
    assert torch.equal(pruneattn.kept_indices(model)[block], expect)


def test_internvl_reads_an_earlier_feature_layer():
    """vision_feature_layer=-2: pruning in block depth - 2, whose output the connector reads (the last block
    runs on the kept tokens)."""
    import vlm_unit_models

    model = vlm_unit_models.internvl(vision_feature_layer=-2)
    model, kept = compare_with_reference("internvl", {"tokens": 6}, model)
    assert list(pruneattn.kept_indices(model)) == [1]


@pytest.mark.parametrize("kind", UNIT_KINDS)
def test_keeping_every_unit_equals_the_unpatched_model(kind):
    """Keep rate 1.0 (no selection; the tower's tokens in unit-major order) and tokens = all units (selection
    of all): the same logits and new tokens as the unpatched model."""
    model, processor, texts, pictures = case(kind)
    call = inputs(processor, texts, pictures)
    ref = copy.deepcopy(model)
    greedy = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    with torch.no_grad():
        want, want_new = ref(**call).logits, ref.generate(**call, **greedy)
    units = 16  # every tile (image) of these prompts has at most 16 units
    for amount in ({"keep_rate": 1.0}, {"tokens": units}):
        pruneattn.patch(model, **amount)
        with torch.no_grad():
            torch.testing.assert_close(model(**call).logits, want, rtol=1e-5, atol=1e-5)
            assert torch.equal(model.generate(**call, **greedy), want_new)


def _word_labels(call: dict) -> torch.Tensor:
    """Labels at the words of the prompts (ids 3 .. 71: no image, layout or padding token)."""
    ids = call["input_ids"]
    return torch.where(call["attention_mask"].bool() & (ids >= 3) & (ids < 72), ids, -100)


@pytest.mark.parametrize("kind", UNIT_KINDS)
def test_training_step_loss_and_gradients(kind):
    model, processor, texts, pictures = case(kind)
    call = inputs(processor, texts, pictures)
    model.train()
    ref = copy.deepcopy(model)
    amount = {"keep_rate": 0.4}
    pruneattn.patch(model, **amount)
    loss = model(**call, labels=_word_labels(call)).loss
    loss.backward()
    kept = reference_units(ref, kind, call, amount)
    short = short_prompt(kind, call, kept)
    short_labels = _word_labels(short)
    features = reference_features(ref, kind, call, [k for k, _ in kept], grad=True)
    expect = ref(**short, mm_encoder_outputs={"image": features}, labels=short_labels).loss
    expect.backward()
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-6)
    params = dict(ref.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        q = params[name]
        if q.grad is None or not q.grad.any():
            assert p.grad is None or not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
        checked += int("vision" in name or "projector" in name or "connector" in name)
    assert checked > 10  # gradients reached the tower's blocks and the connector


def test_gemma3_bidirectional_attention_spans_the_kept_image_tokens():
    """Gemma 3's image tokens attend to each other both ways (token types 1); over a shortened prompt the
    spans are the kept tokens: the patched model equals the reference given the shortened prompt's types,
    and those types matter (without them the reference differs)."""
    amount = {"keep_rate": 0.4}
    model, ref, call = _patched("gemma3", amount)
    with torch.no_grad():
        got = model(**call).logits
    want, short, kept = _reference(ref, "gemma3", call, amount)
    real = short["attention_mask"].bool()
    torch.testing.assert_close(got[real], want.logits[real], rtol=1e-5, atol=1e-5)
    causal = {k: v for k, v in short.items() if k != "token_type_ids"}
    features = reference_features(ref, "gemma3", call, [k for k, _ in kept])
    with torch.no_grad():
        without = ref(**causal, mm_encoder_outputs={"image": features}).logits
    assert (without[real] - want.logits[real]).abs().max() > 1e-3


def _planned_ids(kind: str, amount: dict, texts=None, pictures=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The processor's prompt ids, unpatched and patched for a model patched with ``amount``."""
    model, processor, case_texts, case_pictures = case(kind)
    texts, pictures = texts or case_texts[:1], pictures or case_pictures[:1]
    full = inputs(processor, texts, pictures)["input_ids"]
    pruneattn.patch(model, **amount)
    pruneattn.patch_processor(processor, model)
    return full, inputs(processor, texts, pictures)["input_ids"]


def test_layout_tokens_of_the_planned_prompts():
    """Tile tags, image brackets and row breaks as documented in docs/vlm.md."""
    # InternVL: <img>, then 5 tokens per tile (3 tiles: 2 crops and the thumbnail), then </img>
    full, planned = _planned_ids("internvl", {"tokens": 5})
    assert full[0].tolist() == [5, 81, *[80] * 48, 82, 6] and planned[0].tolist() == [5, 81, *[80] * 15, 82, 6]
    # SmolVLM: each tile's tags as the processor writes them, 3 tokens per tile (4 crops and the whole image)
    full, planned = _planned_ids("smolvlm", {"tokens": 3})
    assert planned[0].tolist() == [5, *[t for tag in (75, 76, 77, 78, 79) for t in (89, tag, 99, 99, 99)], 89, 6]
    assert [t for t in full[0].tolist() if t != 99] == [t for t in planned[0].tolist() if t != 99]
    # Gemma 3: <start_of_image>, the kept tokens, <end_of_image>
    full, planned = _planned_ids("gemma3", {"tokens": 6})
    assert planned[0].tolist() == [5, 83, *[85] * 6, 84, 6]
    # Mistral 3: a 24 x 32 px image is 3 rows of 4 units; 7 kept: a row of 4, [IMG_BREAK], a row of 3, [IMG_END]
    from vlm_processors import images

    full, planned = _planned_ids("mistral3", {"tokens": 7}, ["w5 [IMG] w6"], images((24, 32)))
    assert full[0].tolist() == [5, *([86] * 4 + [87]) * 2, *[86] * 4, 88, 6]
    assert planned[0].tolist() == [5, 86, 86, 86, 86, 87, 86, 86, 86, 88, 6]
    full, planned = _planned_ids("mistral3", {"tokens": 4}, ["w5 [IMG] w6"], images((24, 32)))
    assert planned[0].tolist() == [5, 86, 86, 86, 86, 88, 6]  # one whole row: no [IMG_BREAK]


@pytest.mark.parametrize("kind", ["internvl", "idefics3"])
def test_processor_counts_per_tile_and_per_image(kind):
    """The counts a serving engine asks a patched processor for: each tile's 16 placeholders become the
    kept 5, and what the release counts around them (image start and end tokens, tile tags: counted before
    transformers 5.25) stays; checked against the prompts the processor writes."""
    from vlm_processors import images

    model, processor, texts, pictures = case(kind)
    sizes = [(32, 32), (40, 64)]

    def written() -> list[int]:  # image tokens in the prompt of one image of each size
        return [int((inputs(processor, texts[:1], images(size))["input_ids"] == IMAGE_TOKEN[kind]).sum())
                for size in sizes]

    def counted() -> list[int]:
        return processor._get_num_multimodal_tokens(image_sizes=[list(s) for s in sizes])["num_image_tokens"]

    full_written, full_counted = written(), counted()
    pruneattn.patch(model, tokens=5)
    pruneattn.patch_processor(processor, model)
    planned_written = written()
    assert planned_written == [n // 16 * 5 for n in full_written]
    if kind == "internvl":
        assert full_written == [16, 48]  # one tile; two crops and the thumbnail
    assert [c - w for c, w in zip(counted(), planned_written)] == [c - w for c, w in zip(full_counted, full_written)]
    assert pruneattn.image_tokens(model).kept(16) == 5


def test_processor_counts_of_other_families():
    model, processor, texts, pictures = case("mistral3")
    pruneattn.patch(model, keep_rate=0.5)
    pruneattn.patch_processor(processor, model)
    import transformers
    from pruneattn._versions import release

    if release(transformers.__version__) < (5, 25):  # the count includes 3 [IMG_BREAK] / [IMG_END]: refused
        with pytest.raises(NotImplementedError, match="include its row-break tokens"):
            processor._get_num_multimodal_tokens(image_sizes=[[24, 32]])
    else:
        assert processor._get_num_multimodal_tokens(image_sizes=[[24, 32]])["num_image_tokens"] == [6]  # of 12


# ----------------------------------------------------------------------------- refusals, before any change


def _classes(model):
    return [type(m) for m in model.modules()]


@pytest.mark.parametrize("kind", UNIT_KINDS)
def test_fused_token_is_refused_before_any_change(kind):
    model = case(kind)[0]
    before = _classes(model)
    with pytest.raises(ValueError, match="mode='fuse' is not available .* joins whole windows"):
        pruneattn.patch(model, keep_rate=0.5, mode="fuse")
    assert _classes(model) == before and not model._forward_pre_hooks


@pytest.mark.parametrize("kind,settings,match", [
    ("mistral3", {"vision_feature_layer": -2}, "reads its tower's last block"),
    ("mistral3", {"vision_feature_layer": [-2, -1]}, "reads its tower's last block"),
    ("internvl", {"vision_feature_select_strategy": "full"}, "without the class token"),
    ("internvl", {"vision_feature_layer": [-2, -1]}, "one vision_feature_layer"),
])
def test_settings_the_connector_cannot_read_are_refused(kind, settings, match):
    model = case(kind)[0]
    for name, value in settings.items():
        setattr(model.config, name, value)
    before = _classes(model)
    with pytest.raises(ValueError, match=match):
        pruneattn.patch(model, keep_rate=0.5)
    assert _classes(model) == before


def test_families_that_cannot_be_pruned_cleanly_are_refused_with_the_reason():
    from transformers import (
        CLIPVisionConfig,
        Gemma4Config,
        Gemma4ForConditionalGeneration,
        Gemma4TextConfig,
        Gemma4VisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
    )

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=100)
    clip = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8)
    gemma4 = Gemma4Config(
        text_config=Gemma4TextConfig(**text, num_key_value_heads=1, head_dim=8, hidden_size_per_layer_input=8,
                                     vocab_size_per_layer_input=100),
        vision_config=Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4, head_dim=8),
        audio_config=None,
    )
    cases = [
        (LlavaNextForConditionalGeneration(LlavaNextConfig(vision_config=clip, text_config=dict(text, model_type="llama"))),
         "stitched into one grid and cropped .* newline token after each row"),
        (LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(vision_config=clip, text_config=dict(text, model_type="qwen2"))),
         "stitched into one grid and cropped .* newline token after each row"),
        (Gemma4ForConditionalGeneration(gemma4), "normalizes q, k and v per head .* pools 3 x 3 windows"),
    ]
    for model, match in cases:
        before = _classes(model)
        with pytest.raises(TypeError, match=f"does not support {type(model).__name__}: .*{match}"):
            pruneattn.patch(model, keep_rate=0.5)
        with pytest.raises(TypeError, match=match):
            pruneattn.patch(model.model, keep_rate=0.5)
        assert _classes(model) == before


def test_calls_that_do_not_fit_the_units_are_refused_before_the_tower_runs():
    model, processor, texts, pictures = case("mistral3")
    pruneattn.patch(model, keep_rate=0.5)
    call = inputs(processor, texts, pictures)
    ran = []
    tower_of(model).register_forward_pre_hook(lambda *a: ran.append(1))
    odd = call["image_sizes"].clone()
    odd[0, 0] -= 4  # a size of 4 px patches that are not whole 2 x 2 units
    with pytest.raises(ValueError, match="not a whole number of 8 x 8 pixel units"), torch.no_grad():
        model(**{**call, "image_sizes": odd})
    with pytest.raises(ValueError, match="pass the processor's image_sizes"), torch.no_grad():
        model(**{k: v for k, v in call.items() if k != "image_sizes"})
    model, processor, texts, pictures = case("smolvlm")
    pruneattn.patch(model, keep_rate=0.5)
    call = inputs(processor, texts, pictures)
    tower_of(model).register_forward_pre_hook(lambda *a: ran.append(1))
    mask = call["pixel_attention_mask"].clone()
    mask[0, 0, -4:] = 0  # a tile padded inside
    with pytest.raises(ValueError, match="padded inside their tiles"), torch.no_grad():
        model(**{**call, "pixel_attention_mask": mask})
    assert not ran


# ----------------------------------------------------------------------------- the patched parts


@pytest.mark.parametrize("kind", UNIT_KINDS)
def test_base_model_alone_and_its_image_features(kind):
    model, processor, texts, pictures = case(kind)
    call = inputs(processor, texts, pictures)
    base = copy.deepcopy(model.model)
    pruneattn.patch(model, tokens=3)
    pruneattn.patch(base, tokens=3)
    with torch.no_grad():
        logits = model(**call).logits
        hidden = base(**call).last_hidden_state
        torch.testing.assert_close(model.lm_head(hidden), logits, rtol=1e-5, atol=1e-5)
        names = {"image_sizes", "pixel_attention_mask"}
        features = model.get_image_features(call["pixel_values"], **{k: v for k, v in call.items() if k in names})
    pooled = features.pooler_output
    rows = [len(p) for p in pooled] if isinstance(pooled, (list, tuple)) else [pooled.shape[1]] * pooled.shape[0]
    assert sum(rows) == int((call["input_ids"] == IMAGE_TOKEN[kind]).sum() * 3 // 16) or kind == "mistral3"
    if kind == "mistral3":
        assert rows == [3] * len(call["image_sizes"])
    with torch.no_grad():  # return_dict from the call, else from the config, as the model's own method
        as_tuple = model.get_image_features(call["pixel_values"], **{k: v for k, v in call.items() if k in names},
                                            return_dict=False)
        model.config.return_dict = model.model.config.return_dict = False
        from_config = model.model.get_image_features(call["pixel_values"],
                                                     **{k: v for k, v in call.items() if k in names})
    for out in (as_tuple, from_config):
        assert isinstance(out, tuple) and any(o is not None and len(o) == len(pooled) for o in out)


def test_a_call_for_another_feature_layer_is_refused():
    model, processor, texts, pictures = case("internvl")
    pruneattn.patch(model, tokens=3)
    call = inputs(processor, texts, pictures)
    with pytest.raises(ValueError, match="patched for vision_feature_layer=-1; the call asks for -2"):
        model.get_image_features(call["pixel_values"], vision_feature_layer=-2)
    with pytest.raises(ValueError, match="vision_feature_layer"):
        model(**call, vision_feature_layer=-2)


@pytest.mark.parametrize("kind", UNIT_KINDS)
def test_earlier_pruning_blocks_keep_whole_units(kind):
    """An earlier pruning block (EViT-style): keeping everything there equals the unpatched model (the
    blocks after it see the tokens unit after unit, Mistral 3's rotary tables with them); pruning there and
    in the feature block keeps whole units, those of the feature block among those of the earlier one."""
    model, processor, texts, pictures = case(kind)
    call = inputs(processor, texts, pictures)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        want = ref(**call).logits
        pruneattn.patch(model, keep_rate=[1.0, 1.0], layers=[0, 2])
        torch.testing.assert_close(model(**call).logits, want, rtol=1e-5, atol=1e-5)
        pruneattn.patch(model, keep_rate=[0.6, 0.5], layers=[0, 2])
        model(**call)
    kept = pruneattn.kept_indices(model)
    m = SIDE[kind]
    for early, late in zip(kept[0], kept[2]):
        early, late = early[early >= 0], late[late >= 0]
        assert set(late.tolist()) <= set(early.tolist())
        for rows in (early, late):  # whole m x m windows
            width = {"gemma3": 16, "mistral3": None}.get(kind, 8)  # patches per row (Mistral 3: per image)
            if width is not None:
                units = {(int(p) // width // m, int(p) % width // m) for p in rows}
                assert len(rows) == len(units) * m * m


@pytest.mark.parametrize("kind", ["internvl", "mistral3", "smolvlm"])
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    """A checkpointed block is run again outside the call; it gets the same reordered inputs."""
    grads = []
    for checkpointing in (False, True):
        model, processor, texts, pictures = case(kind)
        call = inputs(processor, texts, pictures)
        model.train()
        if checkpointing:
            tower_of(model).activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        pruneattn.patch(model, keep_rate=[0.6, 0.5], layers=[1, 2])
        block = (tower_of(model).encoder.layer if kind == "internvl" else tower_of(model).transformer.layers
                 if kind == "mistral3" else tower_of(model).encoder.layers)[2]
        runs = []
        (block.feed_forward if kind == "mistral3" else block.mlp).register_forward_pre_hook(lambda *a: runs.append(1))
        model(**call, labels=_word_labels(call)).loss.backward()
        assert len(runs) == 1 + checkpointing  # the pruning block's forward ran again in the backward pass
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)
