"""Qwen3-VL (and -MoE), Qwen3.5 (and -MoE) and GLM-4.1V / 4.5V / 4.6V patched: their language models read
only the kept merged units, at their own (interleaved) M-RoPE positions, Qwen3-VL's DeepStack features
at the same kept units.

The truth is written from the UNPATCHED model (mrope_reference.py): each image's kept units by its
tower's last block recomputed by hand from that block's q / k; the unpatched model's own language-model
inputs for the full prompt (image features and DeepStack features scattered into the placeholders, its
``get_rope_index`` positions) with the dropped units' rows removed, fed to its own language model; greedy
decoding continued by hand at each row's largest position + 1; the loss and its gradients through the
unpatched tower and merger at the kept rows. The batch holds images of different sizes, two images in one
prompt, left padding and a prompt without an image. Random weights from small configs, q / k of the tower
scaled so that the unit scores differ. The planned and full prompt paths with offline processors:
``tests/test_vlm_planned.py`` and ``tests/test_vlm_full_prompt.py``.
"""
from __future__ import annotations

import copy

import pytest
import torch

import pruneattn
from merged_reference import sharpened
from model_reference import one_thread  # noqa: F401  (fixture)
from mrope_reference import (
    PATCH,
    kept_units,
    prompt,
    reference_greedy,
    reference_inputs,
    reference_logits,
)

transformers = pytest.importorskip("transformers")

PAD = 0
QWEN = dict(image_token_id=90, vision_start_token_id=91, vision_end_token_id=92, video_token_id=93)
GLM = dict(image_token_id=100, image_start_token_id=101, image_end_token_id=102, video_token_id=103,
           video_start_token_id=104, video_end_token_id=105)
KINDS = ["qwen3-vl", "qwen3-vl-moe", "qwen3.5", "qwen3.5-moe", "glm4.1v", "glm4.5v", "glm4.6v"]
CLASSES = {  # kind: (generation model, config)
    "qwen3-vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLConfig"),
    "qwen3-vl-moe": ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeConfig"),
    "qwen3.5": ("Qwen3_5ForConditionalGeneration", "Qwen3_5Config"),
    "qwen3.5-moe": ("Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeConfig"),
    "glm4.1v": ("Glm4vForConditionalGeneration", "Glm4vConfig"),
    "glm4.5v": ("Glm4vMoeForConditionalGeneration", "Glm4vMoeConfig"),
    "glm4.6v": ("Glm46VForConditionalGeneration", "Glm46VConfig"),
}
_TEXT = dict(vocab_size=110, hidden_size=64, intermediate_size=128, num_hidden_layers=3, pad_token_id=PAD,
             bos_token_id=1, eos_token_id=2)
_ROPE = dict(rope_type="default", rope_theta=10000.0)


def glm(kind: str) -> bool:
    return kind.startswith("glm")


def tokens(kind: str) -> dict:
    """The model's image token ids (its config's names)."""
    return GLM if glm(kind) else QWEN


def _text(kind: str) -> dict:
    if kind.startswith("qwen3-vl"):  # interleaved M-RoPE over 16-dim heads
        text = dict(_TEXT, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    rope_parameters=dict(_ROPE, mrope_section=[2, 3, 3], mrope_interleaved=True))
        return text if kind == "qwen3-vl" else dict(text, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    if kind.startswith("qwen3.5"):  # Gated-DeltaNet and attention layers; rotary over a quarter of the head
        text = dict(_TEXT, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    layer_types=["linear_attention", "full_attention", "linear_attention"],
                    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                    rope_parameters=dict(_ROPE, mrope_section=[2, 1, 1], mrope_interleaved=True,
                                         partial_rotary_factor=0.25))
        return text if kind == "qwen3.5" else dict(text, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                   shared_expert_intermediate_size=32)
    text = dict(_TEXT, num_attention_heads=2, num_key_value_heads=1,  # GLM: rotary over half of 32-dim heads
                rope_parameters=dict(_ROPE, mrope_section=[2, 3, 3], partial_rotary_factor=0.5))
    if kind == "glm4.5v":
        text.update(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1)
    return text


def model(kind: str, seed: int = 0, width: int = 64, heads: int = 4, dtype=torch.float64):
    """A small ``kind`` model: a 4-block tower of ``heads`` heads (Qwen3-VL: DeepStack from blocks 0, 1, 2,
    added in the three language-model layers), 4 px patches, 2 x 2 units, q / k scaled by 3."""
    torch.manual_seed(seed)
    vision = dict(depth=4, hidden_size=width, num_heads=heads, intermediate_size=96, out_hidden_size=64,
                  patch_size=PATCH, temporal_patch_size=2, spatial_merge_size=2)
    if glm(kind):
        vision.update(image_size=8 * PATCH)  # an 8 x 8 table of learned position embeddings
    else:
        vision.update(num_position_embeddings=64)
    if kind.startswith("qwen3-vl"):
        vision.update(deepstack_visual_indexes=[0, 1, 2])
    generation, config = CLASSES[kind]
    cfg = getattr(transformers, config)(text_config=_text(kind), vision_config=vision, **tokens(kind))
    out = getattr(transformers, generation)(cfg).eval().to(dtype)
    if "moe" in kind or kind == "glm4.5v":
        out.set_experts_implementation("eager")  # the grouped GEMM takes no float64
    sharpened(out.model.visual)
    return out


GRIDS = [(1, 8, 12), (1, 4, 4), (1, 6, 4)]
# row 0: one image; row 1: two images of different sizes; row 2: no image (all rows left-padded to row 1)
PROMPTS = [[[5, 6, 7], 0, [8, 9]], [[5], 1, [10], 2, [8, 9, 10, 11]], [[12, 13, 14, 15, 16]]]


def batch(kind: str, prompts=PROMPTS, grids=GRIDS) -> dict:
    t = tokens(kind)
    start, end = ((t["image_start_token_id"], t["image_end_token_id"]) if glm(kind)
                  else (t["vision_start_token_id"], t["vision_end_token_id"]))
    return prompt(prompts, grids, t["image_token_id"], start, end, PAD)


def _amount(amount) -> dict:
    return {"tokens": amount} if isinstance(amount, int) else {"keep_rate": amount}


@pytest.mark.usefixtures("cpu_backend")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("amount", [0.25, 3], ids=["rate0.25", "tokens3"])
def test_logits_kept_units_and_greedy_tokens_match_the_reference(amount, kind):
    m = model(kind)
    call = batch(kind)
    kept = kept_units(m, call, amount)
    with torch.no_grad():
        ref = reference_inputs(m, call, kept)
        want = reference_logits(m, ref)
    greedy = reference_greedy(m, ref, steps=4)
    assert len(ref.deepstack) == (3 if kind.startswith("qwen3-vl") else 0)
    pruneattn.patch(m, **_amount(amount))
    with torch.no_grad():
        got = m(**call)
    assert got.logits.shape[:2] == ref.mask.shape
    real = ref.mask.bool()
    torch.testing.assert_close(got.logits[real], want[real], rtol=1e-9, atol=1e-9)
    found = pruneattn.kept_indices(m)[3]
    assert [[int(u) for u in r if u >= 0] for r in found] == kept
    with torch.no_grad():
        out = m.generate(**call, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    L = call["input_ids"].shape[1]
    assert torch.equal(out[:, :L], call["input_ids"])
    assert torch.equal(out[:, L:], greedy)


@pytest.mark.usefixtures("cpu_backend")
@pytest.mark.parametrize("kind", KINDS)
def test_keep_all_equals_unpatched(kind):
    m = model(kind)
    call = batch(kind)
    text = {"input_ids": torch.tensor([[5, 6, 7, 8]])}
    with torch.no_grad():
        want, want_text = m(**call).logits, m(**text).logits
        want_gen = m.generate(**call, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        pruneattn.patch(m, keep_rate=1.0)
        got, got_text = m(**call).logits, m(**text).logits
        got_gen = m.generate(**call, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    real = call["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_text, want_text, rtol=0, atol=0)
    assert torch.equal(got_gen, want_gen)


@pytest.mark.usefixtures("cpu_backend")
@pytest.mark.parametrize("kind", KINDS)
def test_labels_loss_and_a_training_step(kind):
    """In training mode, the loss and its gradients in the tower, the merger (and DeepStack mergers) and the
    language model equal those of the unpatched model fed the kept rows."""
    m = model(kind).train()
    ref_model = copy.deepcopy(m)
    call = batch(kind)
    image = tokens(kind)["image_token_id"]
    labels = call["input_ids"].masked_fill((call["attention_mask"] == 0) | (call["input_ids"] == image), -100)
    kept = kept_units(ref_model, call, 0.5)
    ref = reference_inputs(ref_model, call, kept)
    want = ref_model.loss_function(logits=reference_logits(ref_model, ref), labels=ref.labels(labels), vocab_size=110)
    want.backward()
    pruneattn.patch(m, keep_rate=0.5)
    got = m(**call, labels=labels)
    got.loss.backward()
    torch.testing.assert_close(got.loss, want, rtol=1e-9, atol=1e-9)
    grads = {n: p.grad for n, p in ref_model.named_parameters()}
    reached = set()
    for name, p in m.named_parameters():
        if p.grad is None:
            assert grads[name] is None or not grads[name].any(), name
            continue
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-7, atol=1e-10, msg=name)
        if p.grad.abs().sum() > 0:
            reached.add(name.split(".")[2] if name.startswith("model.visual.") else name.split(".")[1])
    merger = {"merger"} | ({"deepstack_merger_list"} if kind.startswith("qwen3-vl") else set())
    assert {"blocks", "language_model"} | merger <= reached
    with torch.no_grad():  # the base model called directly is pruned too
        assert m.model(**call).last_hidden_state.shape[1] == ref.mask.shape[1]


@pytest.mark.usefixtures("cpu_backend")
@pytest.mark.parametrize("kind", ["qwen3-vl-moe", "qwen3.5", "glm4.6v"])
def test_base_model_patched_alone(kind):
    """The base model (``Qwen3VLMoeModel``, ...) patched on its own: its hidden states at the real positions
    are the unpatched language model's on the kept rows."""
    base = model(kind).model
    call = batch(kind)
    holder = _Holder(base)
    kept = kept_units(holder, call, 0.5)
    with torch.no_grad():
        ref = reference_inputs(holder, call, kept)
        want = base.language_model(**ref.language_model_inputs()).last_hidden_state
        pruneattn.patch(base, keep_rate=0.5)
        got = base(**call).last_hidden_state
    real = ref.mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-9, atol=1e-9)


class _Holder:
    """A base model where the references look for a generation model's (``.model``, ``.config``)."""

    def __init__(self, base) -> None:
        self.model, self.config = base, base.config


@pytest.mark.parametrize("kind, head_dim", [("qwen3-vl", 64), ("glm4.1v", 80)])
def test_triton_interpreter_small_config(kind, head_dim, device):
    """The default backend (the Triton kernels; the interpreter on the CPU) in float32 against the float64
    reference: the same kept units, logits to float32's precision."""
    m = model(kind, width=2 * head_dim, heads=2, dtype=torch.float32)
    truth = model(kind, width=2 * head_dim, heads=2)
    call = batch(kind)
    kept = kept_units(truth, call, 0.5)
    with torch.no_grad():
        ref = reference_inputs(truth, call, kept)
        want = reference_logits(truth, ref)
    pruneattn.patch(m, keep_rate=0.5)
    assert pruneattn.backend.backend_for(device) == "triton"
    run = {k: v.to(device) for k, v in call.items()}
    run["pixel_values"] = run["pixel_values"].float()
    with torch.no_grad():
        got = m.to(device)(**run).logits.cpu().double()
    assert [[int(u) for u in r if u >= 0] for r in pruneattn.kept_indices(m)[3].cpu()] == kept
    real = ref.mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("cpu_backend")
@pytest.mark.parametrize("kind", ["qwen3-vl", "qwen3.5", "glm4.1v"])
def test_videos_are_refused_with_the_way_out(kind):
    m = model(kind)
    call = batch(kind)
    pruneattn.patch(m, keep_rate=0.5)
    ran = []
    m.model.visual.register_forward_pre_hook(lambda *a: ran.append(1))
    video = dict(pixel_values_videos=call["pixel_values"], video_grid_thw=call["image_grid_thw"])
    with pytest.raises(ValueError, match=r"prunes image tokens; videos .*\(pruneattn.unpatch\)"), torch.no_grad():
        m(**call, **video)
    with pytest.raises(ValueError, match="prunes image tokens; videos"), torch.no_grad():
        m.get_video_features(**video)
    assert not ran
    pruneattn.unpatch(m)
    with torch.no_grad():
        m.get_video_features(**video)  # the unpatched model's own again


@pytest.mark.parametrize("kind", KINDS)
def test_refusals_touch_nothing(kind):
    m = model(kind, dtype=torch.float32)
    before = [type(x) for x in m.modules()]
    for kwargs, error in (({"mode": "fuse"}, "mode='fuse'"), ({"layers": [4]}, r"block indices in \[0, 4\)"),
                          ({"query": "cls"}, "class token")):
        with pytest.raises(ValueError, match=error):
            pruneattn.patch(m, **kwargs)
    with pytest.raises(TypeError, match=f"is the base model of a {type(m).__name__}"):
        pruneattn.patch(m.model)
    assert [type(x) for x in m.modules()] == before
    assert not any(x._forward_hooks or x._forward_pre_hooks for x in m.modules())
    assert "_pruneattn_vlm" not in m.model.__dict__
