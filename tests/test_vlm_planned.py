"""The planned path: ``pruneattn.patch_processor`` makes the processor write the image tokens the patched
model reads, and the model uses that prompt as it is.

The truth is the full-prompt path (the unpatched processor's prompt, shortened by the model), which
``tests/test_vlm.py`` and ``tests/test_vlm_qwen.py`` hold against references written there from the
unpatched models: the planned prompt must give the same logits at every real position and the same new
tokens; and since it is the model's own sequence, everything that reads the sequence (streamers,
stopping criteria, continuations, a caller's own loop, assisted decoding, pipelines) must behave as for
any model. Processors are built offline (``tests/vlm_processors.py``).
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.stopping_criteria import MaxLengthCriteria
from transformers.generation.streamers import BaseStreamer

import pruneattn
from model_reference import one_thread  # noqa: F401 (fixture)
from vlm_processors import KINDS, case, image_token, inputs, llava_processor, mrope, qwen_processor

pytestmark = pytest.mark.usefixtures("cpu_backend")

AMOUNT = {"llava": {"tokens": 5}, "paligemma": {"tokens": 4, "mode": "fuse"}, "qwen2.5-vl": {"keep_rate": 0.4},
          "qwen2-vl": {"tokens": 3}, "qwen3-vl": {"keep_rate": 0.3}, "qwen3-vl-moe": {"tokens": 5},
          "qwen3.5": {"keep_rate": 0.4}, "qwen3.5-moe": {"tokens": 3}, "glm4.1v": {"keep_rate": 0.3},
          "glm4.5v": {"tokens": 4}, "glm4.6v": {"keep_rate": 0.5}, "internvl": {"tokens": 5},
          "gemma3": {"keep_rate": 0.4}, "mistral3": {"keep_rate": 0.5}, "smolvlm": {"tokens": 3},
          "idefics3": {"keep_rate": 0.3}}
UNITS = {"internvl": 4, "gemma3": 16, "mistral3": 4, "smolvlm": 4, "idefics3": 4}  # patches per language-model token
GREEDY = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)


def patched(kind: str, seed: int = 0, planned: bool = False):
    """The model of ``kind`` patched, its processor (patched too for the planned path), prompts and images."""
    model, processor, texts, pictures = case(kind, seed)
    pruneattn.patch(model, **AMOUNT[kind])
    if planned:
        pruneattn.patch_processor(processor, model)
    return model, processor, texts, pictures


PATHS = pytest.mark.parametrize("planned", [True, False], ids=["planned", "full"])


def runs(ids: torch.Tensor, token: int) -> list[int]:
    """Lengths of the runs of ``token`` in each row, rows in order: each image's placeholders."""
    out = []
    for row in ids.tolist():
        n = 0
        for t in row + [None]:
            if t == token:
                n += 1
            elif n:
                out.append(n)
                n = 0
    return out


def kept_per_image(model, kind: str) -> list[int]:
    """Language-model tokens each image (tile) keeps, from ``kept_indices`` (patches)."""
    kept = pruneattn.kept_indices(model)
    return [n // UNITS.get(kind, 1) for n in (next(reversed(kept.values())) >= 0).sum(1).tolist()]


def runs_of_tiles(kind: str, counts: list[int], full: dict) -> list[int]:
    """The runs of placeholders the processor writes for these kept counts per tile: InternVL writes one run
    for all tiles of an image (``full``: its unpatched runs, tiles of 16)."""
    if kind != "internvl":
        return counts
    out, t = [], 0
    for n in runs(full["input_ids"], image_token(kind)):
        out.append(sum(counts[t : t + n // 16]))
        t += n // 16
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_planned_prompt_gives_what_the_full_prompt_gives(kind):
    model, processor, texts, pictures = patched(kind)
    full = inputs(processor, texts, pictures)
    with torch.no_grad():
        want = model(**full).logits
        want_new = model.generate(**full, **GREEDY)[:, full["input_ids"].shape[1]:]
    assert pruneattn.patch_processor(processor, model) is processor
    planned = inputs(processor, texts, pictures)
    with torch.no_grad():
        got = model(**planned)
    # The processor wrote, per image, the tokens the model kept (the fused token counts on PaliGemma).
    fused = int(AMOUNT[kind].get("mode") == "fuse")
    kept = runs_of_tiles(kind, [k + fused for k in kept_per_image(model, kind)], full)
    assert sum(runs(planned["input_ids"], image_token(kind))) == sum(kept)
    if kind != "mistral3":  # Mistral 3 writes rows (tests/test_vlm_units.py)
        assert runs(planned["input_ids"], image_token(kind)) == kept
    assert got.logits.shape == want.shape  # the shortened prompt is the planned prompt, padded alike
    real = planned["attention_mask"].bool()
    torch.testing.assert_close(got.logits[real], want[real], rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        sequences = model.generate(**planned, **GREEDY)
    L = planned["input_ids"].shape[1]
    assert torch.equal(sequences[:, :L], planned["input_ids"])  # the caller's sequence is the model's
    assert torch.equal(sequences[:, L:], want_new)


class Recorder(BaseStreamer):
    def __init__(self) -> None:
        self.puts: list[torch.Tensor] = []

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.clone())

    def end(self) -> None:
        self.puts.append(None)


class SeesPrompt(StoppingCriteria):
    """Stops once the row has ``new`` tokens after ``prompt``; fails the test unless every sequence starts
    with ``prompt`` (the caller's)."""

    def __init__(self, prompt: torch.Tensor, new: int) -> None:
        self.prompt, self.new = prompt, new

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        assert torch.equal(input_ids[:, : self.prompt.shape[1]], self.prompt)
        done = input_ids.shape[1] - self.prompt.shape[1] >= self.new
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool)


@pytest.mark.parametrize("kind", KINDS)
@PATHS
def test_streamer_and_stopping_criteria_see_the_callers_sequence(kind, planned):
    model, processor, texts, pictures = patched(kind, planned=planned)
    one = inputs(processor, texts[:1], pictures[:1])
    L = one["input_ids"].shape[1]
    streamer = Recorder()
    with torch.no_grad():
        out = model.generate(**one, **GREEDY, streamer=streamer)
        by_length = model.generate(**one, max_new_tokens=20, do_sample=False,
                                   stopping_criteria=StoppingCriteriaList([MaxLengthCriteria(L + 3)]))
        by_own = model.generate(**one, max_new_tokens=20, do_sample=False,
                                stopping_criteria=StoppingCriteriaList([SeesPrompt(one["input_ids"], 2)]))
    assert torch.equal(streamer.puts[0], one["input_ids"])  # the caller's prompt, first
    assert torch.equal(torch.cat([p for p in streamer.puts[1:-1]], dim=-1).view(1, -1), out[:, L:])
    assert by_length.shape[1] - L == 3 and torch.equal(by_length, out[:, : L + 3])
    assert by_own.shape[1] - L == 2 and torch.equal(by_own, out[:, : L + 2])


def _continued(model, first: dict, turn: list[int]) -> tuple:
    """A second turn after a first ``generate``: with its cache and the caller's whole conversation so far,
    and the same from one call of the whole conversation with the images (no cache). Returns both
    ``generate`` outputs (sequences and the logits of each step)."""
    with torch.no_grad():
        out = model.generate(**first, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    seq = out.sequences
    added = seq.shape[1] - first["input_ids"].shape[1] + len(turn)
    conversation = {
        "input_ids": torch.cat([seq, torch.tensor([turn] * seq.shape[0])], dim=1),
        "attention_mask": torch.cat([first["attention_mask"], torch.ones(seq.shape[0], added, dtype=torch.long)], dim=1),
    }
    # PaliGemma's token types mark the suffix (1), Gemma 3's the image tokens
    after = {"token_type_ids": int(type(model).__name__.startswith("PaliGemma")), "mm_token_type_ids": 0}
    for name, value in after.items():
        if name in first:
            conversation[name] = torch.cat([first[name], torch.full((seq.shape[0], added), value)], dim=1)
    images = {k: v for k, v in first.items() if k in ("pixel_values", "image_grid_thw", "image_sizes", "pixel_attention_mask")}
    kw = dict(GREEDY, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        return model.generate(**conversation, cache=out.cache, **kw), model.generate(**conversation, **images, **kw)


@pytest.mark.parametrize("kind", KINDS)
@PATHS
def test_continuing_the_cache_is_one_longer_call(kind, planned):
    """Multi-turn chat as transformers shows it: the returned cache and the whole conversation so far."""
    model, processor, texts, pictures = patched(kind, planned=planned)
    first = inputs(processor, texts, pictures)
    got, want = _continued(model, first, [11, 12, 13])
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=1e-5, atol=1e-5)


def _own_loop(model, call: dict, steps: int, with_mask: bool) -> torch.Tensor:
    """Greedy decoding by hand: a forward with the images and a cache, then one token at a time."""
    with torch.no_grad():
        out = model(**call, use_cache=True)
        mask, tokens = call.get("attention_mask"), []
        for _ in range(steps):
            tokens.append(out.logits[:, -1].argmax(-1))
            kw = {}
            if with_mask:
                mask = kw["attention_mask"] = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=tokens[-1][:, None], cache=out.cache, use_cache=True, **kw)
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize("kind", KINDS)
@PATHS
def test_own_decoding_loop_equals_generate(kind, planned):
    model, processor, texts, pictures = patched(kind, planned=planned)
    call = inputs(processor, texts, pictures)
    positions_3d = mrope(kind)
    if positions_3d:  # transformers' M-RoPE models refuse a 2-D mask after the first step (unpatched too): batch 1, no mask
        call = inputs(processor, texts[:1], pictures[:1])
        del call["attention_mask"]
    with torch.no_grad():
        want = model.generate(**call, **GREEDY)[:, call["input_ids"].shape[1]:]
    assert torch.equal(_own_loop(model, call, 4, with_mask=not positions_3d), want)


@pytest.mark.parametrize("kind", ["llava", "qwen2.5-vl"])
@PATHS
def test_assisted_decoding_equals_greedy(kind, planned):
    model, processor, texts, pictures = patched(kind, planned=planned)
    draft, *_ = patched(kind, seed=1)
    call = inputs(processor, texts[:1], pictures[:1])
    with torch.no_grad():
        want = model.generate(**call, **GREEDY)
        for assistant in (draft, pruneattn.unpatch(copy.deepcopy(draft)), model):
            assert torch.equal(model.generate(**call, **GREEDY, assistant_model=assistant), want)


def test_pipeline_reads_the_planned_prompt():
    from PIL import Image
    from transformers import pipeline

    model, processor, texts, pictures = patched("llava")
    pruneattn.patch_processor(processor, model)
    picture = Image.fromarray(pictures[0])
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    out = pipe(images=picture, text=texts[0], max_new_tokens=4, return_full_text=False,
               generate_kwargs={"do_sample": False, "min_new_tokens": 4})
    call = inputs(processor, texts[:1], [pictures[0]])
    with torch.no_grad():
        want = model.generate(**call, **GREEDY)[0, call["input_ids"].shape[1]:]
    assert out[0]["generated_text"].split() == processor.tokenizer.convert_ids_to_tokens(want.tolist())


@pytest.mark.parametrize("kind", ["llava", "qwen2.5-vl"])
def test_keep_all_plans_the_full_prompt(kind):
    model, processor, texts, pictures = case(kind)
    full = inputs(processor, texts, pictures)
    with torch.no_grad():
        want = model(**full).logits
    pruneattn.patch(model, keep_rate=1.0)
    pruneattn.patch_processor(processor, model)
    planned = inputs(processor, texts, pictures)
    assert torch.equal(planned["input_ids"], full["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(**planned).logits, want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- the processor itself


def test_processor_counts_unpatch_and_pickle():
    model, processor, texts, pictures = patched("llava")
    fresh = llava_processor()
    before = inputs(processor, texts, pictures)
    pruneattn.patch_processor(processor, model)
    assert type(processor).__name__ == "LlavaProcessor"  # saved configs keep the class name
    planned = inputs(processor, texts, pictures)
    assert runs(planned["input_ids"], 99) == [5, 5, 5]
    assert processor._get_num_multimodal_tokens(image_sizes=[[32, 32], [64, 48]])["num_image_tokens"] == [5, 5]
    count = pruneattn.image_tokens(model)  # LLaVA's default strategy drops the class token: 16 patches, 16 tokens
    assert (count.full(16), count.kept(16), count.planned(16)) == (16, 5, 5)
    assert fresh._get_num_multimodal_tokens(image_sizes=[[32, 32]])["num_image_tokens"] == [16]
    again = pickle.loads(pickle.dumps(processor))
    assert torch.equal(inputs(again, texts, pictures)["input_ids"], planned["input_ids"])
    pruneattn.unpatch(processor)
    assert type(processor) is type(fresh) and not any(k.startswith("_pruneattn") for k in processor.__dict__)
    assert torch.equal(inputs(processor, texts, pictures)["input_ids"], before["input_ids"])


def test_processor_follows_a_repatched_model_only_when_patched_again():
    """The processor keeps the count it was patched with; a prompt planned for other settings is refused
    by the model with the way out, never read wrongly."""
    model, processor, texts, pictures = patched("llava")
    pruneattn.patch_processor(processor, model)
    pruneattn.patch(model, tokens=7)
    with pytest.raises(ValueError, match="do not match.*patch_processor"):
        model(**inputs(processor, texts, pictures))
    pruneattn.patch_processor(processor, model)
    assert runs(inputs(processor, texts, pictures)["input_ids"], 99) == [7, 7, 7]


def test_qwen_processor_plans_each_image_by_its_size():
    model, processor, texts, pictures = patched("qwen2.5-vl")  # keep_rate 0.4
    full = inputs(processor, texts, pictures)
    units = (full["image_grid_thw"].prod(-1) // 4).tolist()
    pruneattn.patch_processor(processor, model)
    planned = inputs(processor, texts, pictures)
    assert runs(planned["input_ids"], 90) == [max(1, -(-2 * u // 5)) for u in units]
    assert [pruneattn.image_tokens(model).kept(u) for u in units] == runs(planned["input_ids"], 90)
    assert torch.equal(planned["image_grid_thw"], full["image_grid_thw"])  # the images themselves are unchanged


def test_processor_refusals_touch_nothing():
    model, processor, texts, pictures = patched("llava")
    other = llava_processor(strategy="full")  # one more token per image than this model reads
    with pytest.raises(ValueError, match="writes 17 image tokens per image where this LlavaForConditionalGeneration"):
        pruneattn.patch_processor(other, model)
    assert type(other).__mro__[0].__name__ == "LlavaProcessor" and "_pruneattn_tokens" not in other.__dict__
    from transformers import CLIPImageProcessor, LlavaProcessor

    finer = LlavaProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                           processor.tokenizer, patch_size=4, vision_feature_select_strategy="default",
                           num_additional_image_tokens=1)  # 64 patches per image where the tower makes 16
    with pytest.raises(ValueError, match="writes 64 image tokens per image where this LlavaForConditionalGeneration"):
        pruneattn.patch_processor(finer, model)
    qwen = qwen_processor()
    with pytest.raises(ValueError, match="image token .* different models"):
        pruneattn.patch_processor(qwen, model)
    with pytest.raises(TypeError, match="not a vision-language model patched"):
        pruneattn.patch_processor(processor, case("llava")[0])
    with pytest.raises(TypeError, match="not a vision-language model patched"):
        pruneattn.image_tokens(case("llava")[0])
    with pytest.raises(TypeError, match="multimodal processor"):
        pruneattn.patch_processor(processor.tokenizer, model)
    with pytest.raises(TypeError, match="processor patched by pruneattn.patch_processor"):
        pruneattn.unpatch(processor.tokenizer)
