"""The full-prompt path (the processor unpatched, the model shortens the prompt) where a caller steps
outside ``model(**inputs)`` / ``model.generate(**inputs)``: every case either behaves as for the unpatched
model fed the planned prompt, or raises before any work with the way out. The continuation, own-loop,
streamer, stopping-criteria and assisted-decoding cases run in ``tests/test_vlm_planned.py`` for both paths.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import pruneattn
from model_reference import one_thread  # noqa: F401 (fixture)
from vlm_processors import KINDS, case, inputs

pytestmark = pytest.mark.usefixtures("cpu_backend")
GREEDY = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)


def _tower(model):
    base = model.model
    return getattr(base, "vision_tower", None) or base.visual


@pytest.mark.parametrize("kind", KINDS)
def test_base_patched_inside_its_generation_model_is_refused(kind):
    model = case(kind)[0]
    before = [type(m) for m in model.modules()]
    with pytest.raises(TypeError, match=f"is the base model of a {type(model).__name__}.*patch the {type(model).__name__}"):
        pruneattn.patch(model.model, keep_rate=0.5)
    assert [type(m) for m in model.modules()] == before and not model.model._forward_pre_hooks
    alone = copy.deepcopy(model.model)  # a base model of its own is taken
    pruneattn.patch(alone, keep_rate=0.5)


def _ran(model) -> list:
    ran = []
    _tower(model).register_forward_pre_hook(lambda *a: ran.append(1))
    return ran


@pytest.mark.parametrize("kind", ["llava", "paligemma"])
def test_prompts_that_do_not_fit_their_images_are_refused_before_the_tower_runs(kind):
    model, processor, texts, pictures = case(kind)
    pruneattn.patch(model, tokens=4)
    call = inputs(processor, texts[:1], pictures[:1])
    ran = _ran(model)
    ids = call["input_ids"]
    image = 99
    too_few = ids[:, ids[0] != image][:, :2].clone()
    too_few = torch.cat([too_few, torch.full((1, 3), image)], dim=1)
    cases = {
        "too few": too_few,
        "none": ids[:, ids[0] != image],
        "two images, one placeholder run": ids,  # with the pixels of two images
    }
    for name, bad in cases.items():
        pixels = call["pixel_values"] if name != "two images, one placeholder run" else call["pixel_values"].repeat(2, 1, 1, 1)
        with pytest.raises(ValueError, match="Image features and image tokens do not match"), torch.no_grad():
            model(input_ids=bad, pixel_values=pixels)
        with pytest.raises(ValueError, match="Image features and image tokens do not match"), torch.no_grad():
            model.generate(input_ids=bad, pixel_values=pixels, **GREEDY)
    for pixels, match in ((torch.randn(1, 3, 48, 48), "48 x 48 pixels; this model's vision tower takes 32 x 32"),
                          (call["pixel_values"].permute(0, 2, 3, 1), r"must be \(images, 3, height, width\)")):
        with pytest.raises(ValueError, match=match), torch.no_grad():
            model(input_ids=ids, pixel_values=pixels)
    assert not ran


def test_qwen_prompts_and_patches_that_do_not_fit_are_refused_before_the_tower_runs():
    model, processor, texts, pictures = case("qwen2.5-vl")
    pruneattn.patch(model, keep_rate=0.5)
    call = inputs(processor, texts, pictures)
    ran = _ran(model)
    with pytest.raises(ValueError, match="pixel_values hold 100 patches where image_grid_thw makes 136"):
        model(**{**call, "pixel_values": call["pixel_values"][:100]})
    with pytest.raises(ValueError, match="pass the processor's image_grid_thw"):
        model(**{k: v for k, v in call.items() if k != "image_grid_thw"})
    assert not ran


@pytest.mark.parametrize("kind", ["qwen2.5-vl", "qwen2-vl", "qwen3-vl", "glm4.1v"])
def test_get_image_features_of_a_patched_qwen_splits_the_kept_units(kind):
    model, processor, texts, pictures = case(kind)
    call = inputs(processor, texts, pictures)
    tower = copy.deepcopy(model.model.visual)
    pruneattn.patch(model, keep_rate=0.5)
    pruneattn.patch(tower, keep_rate=0.5, layers=[len(tower.blocks) - 1])
    with torch.no_grad():
        got = model.get_image_features(call["pixel_values"], call["image_grid_thw"])
        alone = tower(call["pixel_values"], grid_thw=call["image_grid_thw"])
    units = (call["image_grid_thw"].prod(-1) // 4).tolist()
    assert [f.shape[0] for f in got.pooler_output] == [max(1, -(-u // 2)) for u in units]
    torch.testing.assert_close(torch.cat(got.pooler_output), alone.pooler_output, rtol=0, atol=0)
    for level, want in zip(got.get("deepstack_features") or [], alone.get("deepstack_features") or [], strict=True):
        assert [f.shape[0] for f in level] == [f.shape[0] for f in got.pooler_output]  # Qwen3-VL's DeepStack
        torch.testing.assert_close(torch.cat(level), want, rtol=0, atol=0)
    assert torch.equal(got.kept_units, alone.kept_units)
    with torch.no_grad():  # and they drive the model as its own forward would
        planned_like = model(**{k: v for k, v in call.items() if k != "pixel_values"},
                             mm_encoder_outputs={"image": got})
        direct = model(**call)
    torch.testing.assert_close(planned_like.logits, direct.logits, rtol=0, atol=0)
    with torch.no_grad():  # return_dict as the model's own method takes it: from the call, else the config
        as_tuple = model.get_image_features(call["pixel_values"], call["image_grid_thw"], return_dict=False)
        model.config.return_dict = False
        from_config = model.model.get_image_features(call["pixel_values"], call["image_grid_thw"])
    for out in (as_tuple, from_config):
        assert isinstance(out, tuple) and [f.shape for f in out[1]] == [f.shape for f in got.pooler_output]


def test_a_mask_that_counts_a_shortened_prompt_needs_the_cache_that_holds_it():
    """A cache the model did not return (here a copy) carries no map from the caller's sequence: a mask
    written against the caller's prompt is refused, not read wrongly."""
    model, processor, texts, pictures = case("llava")
    pruneattn.patch(model, tokens=4)
    call = inputs(processor, texts, pictures)
    with torch.no_grad():
        out = model(**call, use_cache=True)
        step = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([call["attention_mask"], torch.ones_like(step)], dim=1)
        model(input_ids=step, attention_mask=mask, cache=out.cache)  # the returned cache: mapped
        with pytest.raises(ValueError, match="counts a prompt this model shortened.*patch_processor"):
            model(input_ids=step, attention_mask=mask, cache=copy.deepcopy(out.cache))


def test_a_new_image_in_a_continuation():
    """Planned prompts take a new image in a later turn as any model does; a full prompt cannot."""
    model, processor, texts, pictures = case("llava")
    pruneattn.patch(model, tokens=4)
    first = inputs(processor, texts[:1], pictures[:1])
    with torch.no_grad():
        out = model.generate(**first, **GREEDY, return_dict_in_generate=True)
    second = inputs(processor, ["w20 <image> w21"], pictures[1:2])
    conversation = torch.cat([out.sequences, second["input_ids"]], dim=1)
    mask = torch.ones_like(conversation)
    with pytest.raises(ValueError, match="new image .* pruneattn.patch_processor"), torch.no_grad():
        model.generate(input_ids=conversation, attention_mask=mask, pixel_values=second["pixel_values"],
                       cache=out.cache, **GREEDY)
    pruneattn.patch_processor(processor, model)
    first = inputs(processor, texts[:1], pictures[:1])
    second = inputs(processor, ["w20 <image> w21"], pictures[1:2])
    with torch.no_grad():
        out = model.generate(**first, **GREEDY, return_dict_in_generate=True)
        conversation = torch.cat([out.sequences, second["input_ids"]], dim=1)
        mask = torch.ones_like(conversation)
        got = model.generate(input_ids=conversation, attention_mask=mask, pixel_values=second["pixel_values"],
                             cache=out.cache, **GREEDY)
        both = torch.cat([first["pixel_values"], second["pixel_values"]])
        want = model.generate(input_ids=conversation, attention_mask=mask, pixel_values=both, **GREEDY)
    assert torch.equal(got, want)


class SeesPromptLength(LogitsProcessor):
    """Bans token 7 until the row holds ``prompt + 1`` tokens, so it acts on the caller's positions."""

    def __init__(self, prompt: int) -> None:
        self.prompt = prompt

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] <= self.prompt:
            scores[:, 7] = -float("inf")
        else:
            scores[:, 7] = float("inf")  # then forces it
        return scores


def test_logits_processors_and_allowed_tokens_see_the_callers_sequence():
    model, processor, texts, pictures = case("llava")
    pruneattn.patch(model, tokens=4)
    call = inputs(processor, texts[:1], pictures[:1])
    L = call["input_ids"].shape[1]
    rows = []

    def allowed(batch_id: int, row: torch.Tensor) -> list[int]:
        rows.append(row.clone())
        return list(range(100))

    with torch.no_grad():
        out = model.generate(**call, **GREEDY, logits_processor=LogitsProcessorList([SeesPromptLength(L)]),
                             prefix_allowed_tokens_fn=allowed)
    assert out[0, L].item() != 7 and out[0, L + 1].item() == 7
    assert all(torch.equal(r[:L], call["input_ids"][0]) for r in rows)


@pytest.mark.parametrize("kind", ["llava", "qwen2.5-vl"])
@pytest.mark.filterwarnings("ignore:Using the model-agnostic default")  # generate's own note on its default
def test_length_limits_count_the_callers_prompt(kind):
    model, processor, texts, pictures = case(kind)
    pruneattn.patch(model, keep_rate=0.3)
    call = inputs(processor, texts, pictures)
    L = call["input_ids"].shape[1]
    with torch.no_grad():
        by_length = model.generate(**call, max_length=L + 3, min_length=L + 3, do_sample=False)
        default = model.generate(**call, do_sample=False, min_new_tokens=20)
    assert by_length.shape[1] == L + 3
    assert default.shape[1] == L + 20  # generate's default: 20 new tokens, whatever the prompt
    assert torch.equal(default[:, : L + 3], by_length)


@pytest.mark.filterwarnings("ignore:Using the model-agnostic default")
def test_a_prompt_given_as_embeddings_generates_as_its_ids():
    """``generate`` from embeddings returns the new tokens only, as for any model; they are the ones the ids
    give, and ``max_length`` counts the caller's prompt there too."""
    model, processor, texts, pictures = case("llava")
    pruneattn.patch(model, tokens=5)
    call = inputs(processor, texts, pictures)
    embeds = model.get_input_embeddings()(call["input_ids"])
    rest = {"attention_mask": call["attention_mask"], "pixel_values": call["pixel_values"]}
    L = call["input_ids"].shape[1]
    with torch.no_grad():
        want = model.generate(**call, **GREEDY)[:, L:]
        got = model.generate(inputs_embeds=embeds, **rest, **GREEDY)
        limited = model.generate(inputs_embeds=embeds, **rest, max_length=L + 2, do_sample=False)
    assert torch.equal(got, want)
    assert limited.shape == (2, 2)


@pytest.mark.parametrize("planned", [False, True], ids=["full-prompt", "planned"])
def test_compiled_forward_generates_as_eager_and_compiles_once(planned):
    """``model.forward`` compiled whole (fullgraph, as transformers' compile tests do): the base model's
    hooks run inside the compiled region and keep their per-call state there without recompiling."""
    model, processor, texts, pictures = case("llava")
    pruneattn.patch(model, tokens=4)
    if planned:
        pruneattn.patch_processor(processor, model)
    call = inputs(processor, texts[:1], pictures[:1])
    with torch.no_grad():
        want_logits = model(**call).logits
    want = model.generate(**call, **GREEDY)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, fullgraph=True, backend="eager", dynamic=False)
    try:
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
            first, again = model(**call).logits, model(**call).logits
        got = model.generate(**call, **GREEDY)
    finally:
        del model.forward
        torch._dynamo.reset()
    torch.testing.assert_close(first, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, want_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, want)
