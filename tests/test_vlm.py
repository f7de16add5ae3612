"""Vision-language models (Hugging Face LLaVA, PaliGemma) against an independent reference.

The reference is written here, from the spec: the unpatched tower's feature block is run by hand with
eager attention (a plain softmax of q k^T), the spec's score (variance over heads of the class row, or
of the mean over query rows) picks the patches, the rest of that block and the later blocks run on the
kept tokens with the model's own modules, and the unpatched VLM is fed a prompt built here with k
placeholders per image whose projector input is replaced by those kept tokens (a forward pre-hook on
the projector). The patched model gets the processor-style prompt (the full count of placeholders).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    GemmaConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaModel,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaModel,
    SiglipVisionConfig,
)

import pruneattn
from model_reference import one_thread  # noqa: F401 (fixture: one intra-op thread for these tiny models)

IMAGE = 99  # the image placeholder id of these configs
PAD = 0
GRID = 16  # 32 x 32 px images, 8 px patches


def _sharpen(tower: torch.nn.Module, factor: float = 4.0) -> None:
    """Scale q so that the random tower's attention (and so the scores) differ between patches."""
    with torch.no_grad():
        for layer in tower.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(factor)


def clip_tower(width: int = 32, heads: int = 4, depth: int = 4) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=depth,
                            num_attention_heads=heads, image_size=32, patch_size=8, projection_dim=width)


def siglip_tower(width: int = 32, heads: int = 4, depth: int = 3) -> SiglipVisionConfig:
    return SiglipVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=depth,
                              num_attention_heads=heads, image_size=32, patch_size=8, vision_use_head=False)


def llava(tower=None, seed: int = 0, base: bool = False, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=100, pad_token_id=PAD)
    cfg = LlavaConfig(vision_config=tower or clip_tower(), text_config=text, image_token_id=IMAGE, **kw)
    model = (LlavaModel if base else LlavaForConditionalGeneration)(cfg).eval()
    _sharpen((model if base else model.model).vision_tower)
    return model


def paligemma(seed: int = 0, base: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    text = GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=1, head_dim=8, vocab_size=100, pad_token_id=PAD)
    cfg = PaliGemmaConfig(vision_config=siglip_tower(), text_config=text, image_token_id=IMAGE, projection_dim=32)
    cfg.vision_config.projection_dim = 32
    model = (PaliGemmaModel if base else PaliGemmaForConditionalGeneration)(cfg).eval()
    _sharpen((model if base else model.model).vision_tower)
    return model


def base_of(model):
    return model if isinstance(model, (LlavaModel, PaliGemmaModel)) else model.model


# ----------------------------------------------------------------------------- the reference


def reference_tower(model, pixels: torch.Tensor, k: int, mode: str, query: str, block: int) -> dict[int, torch.Tensor]:
    """``{hidden-state index: tokens}`` of the unpatched tower pruned by hand at ``block`` (eager
    attention, the spec's score), and the kept patches under key ``"kept"``."""
    tower = base_of(model).vision_tower
    layers = tower.encoder.layers
    prefix = 1 if query == "cls" else 0
    x = tower(pixels, output_hidden_states=True).hidden_states[block]  # the block's input
    layer = layers[block]
    att = layer.self_attn
    h = layer.layer_norm1(x)
    B, N, C = h.shape
    H = att.num_heads

    def heads(p):
        return p(h).view(B, N, H, C // H).transpose(1, 2)

    A = torch.softmax(heads(att.q_proj) @ heads(att.k_proj).transpose(-1, -2) * att.scale, dim=-1)
    x = x + att.out_proj((A @ heads(att.v_proj)).transpose(1, 2).reshape(B, N, C))
    received = A[:, :, 0, prefix:] if query == "cls" else A[:, :, :, prefix:].mean(2)  # (B, H, P)
    score = received.var(dim=1, unbiased=False)
    order = torch.sort(score, dim=1, descending=True, stable=True).indices  # ties: lower index first
    kept = order[:, :k].sort(dim=1).values
    patches = x[:, prefix:]
    keep = torch.gather(patches, 1, kept.unsqueeze(-1).expand(-1, -1, C))
    parts = [x[:, :prefix], keep]
    if mode == "fuse":
        weight = received.mean(1).detach()  # mean over heads of the received attention; no gradient (the package's rule)
        dropped = torch.ones_like(weight, dtype=torch.bool).scatter(1, kept, False)
        w = torch.where(dropped, weight, 0.0)
        parts.append((w / w.sum(1, keepdim=True)).unsqueeze(1) @ patches)
    x = torch.cat(parts, dim=1)
    x = x + layer.mlp(layer.layer_norm2(x))
    out = {block + 1: x, "kept": kept}
    for i in range(block + 1, len(layers)):
        x = layers[i](x, None)
        x = x[0] if isinstance(x, tuple) else x
        out[i + 1] = x
    out["last"] = tower.post_layernorm(x)
    return out


def reference_features(model, pixels, k, mode, query, block) -> tuple[torch.Tensor, torch.Tensor]:
    """The projector input the reference model reads, (images, tokens, C), and the kept patches."""
    hs = reference_tower(model, pixels, k, mode, query, block)
    cfg = base_of(model).config
    if isinstance(cfg, PaliGemmaConfig):
        return hs["last"], hs["kept"]
    depth = cfg.vision_config.num_hidden_layers
    layers = cfg.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else layers
    picked = [hs[f % (depth + 1)] for f in layers]
    if cfg.vision_feature_select_strategy == "default":
        picked = [p[:, 1:] for p in picked]
    return torch.cat(picked, dim=-1), hs["kept"]


def short_prompt(rows: list[list[int]], full: int, kept: int, left: bool, extra: list[list[int]] | None = None):
    """The prompts with each image's ``full`` placeholders cut to ``kept``, padded on one side (here,
    independently of pruneattn's own shortening); ``extra`` rows (labels, token types) follow along."""
    out, out_extra = [], []
    for b, row in enumerate(rows):
        ids, ext, seen = [], [], 0
        for j, t in enumerate(row):
            if t == IMAGE:
                seen += 1
                if (seen - 1) % full >= kept:
                    continue
            ids.append(t)
            ext.append(None if extra is None else extra[b][j])
        out.append(ids)
        out_extra.append(ext)
    n = max(len(r) for r in out)
    ids, mask, ext = [], [], []
    for r, e in zip(out, out_extra):
        pad = n - len(r)
        ids.append([PAD] * pad + r if left else r + [PAD] * pad)
        mask.append([0] * pad + [1] * len(r) if left else [1] * len(r) + [0] * pad)
        ext.append([-100] * pad + e if left else e + [-100] * pad)
    return torch.tensor(ids), torch.tensor(mask), (torch.tensor(ext) if extra is not None else None)


def caller_prompt(images_per_row: list[int], full: int, left: bool, seed: int = 3):
    """Processor-style prompts: text, ``full`` placeholders per image, text; padded on one side."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b, n in enumerate(images_per_row):
        row = torch.randint(3, 90, (2 + b,), generator=g).tolist()
        for _ in range(n):
            row += [IMAGE] * full + torch.randint(3, 90, (2,), generator=g).tolist()
        rows.append(row + torch.randint(3, 90, (3,), generator=g).tolist())
    n = max(len(r) for r in rows)
    ids = [([PAD] * (n - len(r)) + r) if left else (r + [PAD] * (n - len(r))) for r in rows]
    mask = [([0] * (n - len(r)) + [1] * len(r)) if left else ([1] * len(r) + [0] * (n - len(r))) for r in rows]
    return rows, torch.tensor(ids), torch.tensor(mask)


class ReplaceProjectorInput:
    """Forward pre-hook on the reference's projector: it reads the given features instead."""

    def __init__(self, model, features):
        self.features = features
        self.handle = base_of(model).multi_modal_projector.register_forward_pre_hook(self)

    def __call__(self, module, args):
        return (self.features,)


def pixels_for(n: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def feature_block(model) -> int:
    cfg = base_of(model).config
    depth = cfg.vision_config.num_hidden_layers
    if isinstance(cfg, PaliGemmaConfig):
        return depth - 1
    layers = cfg.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else layers
    return min(f % (depth + 1) for f in layers) - 1


def counts(model, k: int, mode: str) -> tuple[int, int]:
    """(placeholders per image in the processor's prompt, tokens per image after pruning)."""
    cfg = base_of(model).config
    cls = 1 if isinstance(cfg.vision_config, CLIPVisionConfig) else 0
    drop = 1 if getattr(cfg, "vision_feature_select_strategy", None) == "default" else 0
    return GRID + cls - drop, k + (mode == "fuse") + cls - drop


def compare_forward(model, images_per_row, k, mode, left, query, labels=False, types=False):
    """Patched logits (and loss) against the reference at every real position."""
    ref = copy.deepcopy(model)
    full, kept = counts(model, k, mode)
    rows, ids, mask = caller_prompt(images_per_row, full, left)
    pixels = pixels_for(sum(images_per_row))
    kw = {}
    ref_kw = {}
    lab = None
    if labels:
        lab = torch.where(mask.bool() & (ids != IMAGE), ids, -100)
        kw["labels"] = lab
    if types:
        tt = torch.zeros_like(ids)
        tt[:, -2:] = 1
        kw["token_type_ids"] = tt
    pruneattn.patch(model, tokens=k, mode=mode)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kw)
    feats, kept_ref = reference_features(ref, pixels, k, mode, query, feature_block(ref))
    extra = [r.tolist() for r in kw["labels"]] if labels else None
    unpadded = [r[m.bool()].tolist() for r, m in zip(ids, mask)]
    if labels:
        extra = [r[m.bool()].tolist() for r, m in zip(kw["labels"], mask)]
    sids, smask, slab = short_prompt(unpadded, full, kept, left, extra)
    if labels:
        ref_kw["labels"] = slab
    if types:
        tt_rows = [r[m.bool()].tolist() for r, m in zip(kw["token_type_ids"], mask)]
        _, _, stt = short_prompt(unpadded, full, kept, left, tt_rows)
        ref_kw["token_type_ids"] = stt.clamp(min=0)
    hook = ReplaceProjectorInput(ref, feats)
    expect = ref(input_ids=sids, attention_mask=smask, pixel_values=pixels, **ref_kw)
    hook.handle.remove()
    assert out.logits.shape == expect.logits.shape
    real = smask.bool()
    torch.testing.assert_close(out.logits[real], expect.logits[real], rtol=1e-5, atol=1e-5)
    if sum(images_per_row):
        torch.testing.assert_close(pruneattn.kept_indices(model)[feature_block(ref)], kept_ref, rtol=0, atol=0)
    if labels:
        torch.testing.assert_close(out.loss, expect.loss, rtol=1e-5, atol=1e-6)
    return model, ref, (ids, mask, pixels, kw), (sids, smask, ref_kw, feats)


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("mode", ["drop", "fuse"])
@pytest.mark.parametrize("left", [True, False])
def test_llava_batch_with_padding_and_0_1_2_images(cpu_backend, mode, left):
    compare_forward(llava(), [0, 1, 2], k=5, mode=mode, left=left, query="cls")


def test_llava_one_image_batch_1(cpu_backend):
    compare_forward(llava(), [1], k=3, mode="drop", left=True, query="cls")


@pytest.mark.parametrize("layer,strategy", [(-1, "full"), ([-3, -1], "default"), ([1, -2], "full"), (2, "default")])
def test_llava_feature_layers_and_strategies(cpu_backend, layer, strategy):
    model = llava(vision_feature_layer=layer, vision_feature_select_strategy=strategy)
    compare_forward(model, [1, 2], k=6, mode="fuse", left=True, query="cls")


def test_llava_with_siglip_tower(cpu_backend):
    model = llava(siglip_tower(), vision_feature_layer=-1, vision_feature_select_strategy="full")
    compare_forward(model, [2, 1], k=4, mode="drop", left=False, query="mean")


@pytest.mark.parametrize("mode", ["drop", "fuse"])
def test_paligemma_token_types_labels_and_padding(cpu_backend, mode):
    compare_forward(paligemma(), [1, 1, 0], k=5, mode=mode, left=True, query="mean", labels=True, types=True)


def test_llava_labels(cpu_backend):
    compare_forward(llava(), [0, 1, 2], k=4, mode="drop", left=False, query="cls", labels=True)


def test_triton_interpreter_small_config(device):
    """The default backend (Triton kernels; the interpreter on the CPU), head dim 16."""
    assert pruneattn.backend.backend_for(device) == "triton"
    compare_forward(llava(clip_tower(width=64, heads=4, depth=3)), [1, 1], k=6, mode="fuse", left=True, query="cls")


def test_base_models_patched_alone(cpu_backend):
    for model, query in ((llava(base=True), "cls"), (paligemma(base=True), "mean")):
        ref = copy.deepcopy(model)
        full, kept = counts(model, 4, "drop")
        rows, ids, mask = caller_prompt([1, 2], full, left=True)
        pixels = pixels_for(3)
        pruneattn.patch(model, tokens=4)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        feats, _ = reference_features(ref, pixels, 4, "drop", query, feature_block(ref))
        sids, smask, _ = short_prompt([r[m.bool()].tolist() for r, m in zip(ids, mask)], full, kept, True)
        hook = ReplaceProjectorInput(ref, feats)
        expect = ref(input_ids=sids, attention_mask=smask, pixel_values=pixels)
        hook.handle.remove()
        real = smask.bool()
        torch.testing.assert_close(out.last_hidden_state[real], expect.last_hidden_state[real], rtol=1e-5, atol=1e-5)


def test_positional_arguments_and_embeddings(cpu_backend):
    """input_ids, pixel_values, attention_mask passed positionally; a prompt given as embeddings."""
    model = llava()
    full, _ = counts(model, 5, "drop")
    _, ids, mask = caller_prompt([1, 1], full, left=True)
    pixels = pixels_for(2)
    pruneattn.patch(model, tokens=5)
    by_name = model(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    torch.testing.assert_close(model(ids, pixels, mask).logits, by_name, rtol=0, atol=0)
    embeds = model.get_input_embeddings()(ids)
    from_embeds = model(inputs_embeds=embeds, pixel_values=pixels, attention_mask=mask).logits
    torch.testing.assert_close(from_embeds, by_name, rtol=1e-6, atol=1e-6)


def test_keep_all_equals_unpatched(cpu_backend):
    for make in (llava, paligemma):
        model = make()
        ref = copy.deepcopy(model)
        full, _ = counts(model, GRID, "drop")
        _, ids, mask = caller_prompt([1, 2], full, left=True)
        pixels = pixels_for(3)
        expect = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        for kwargs in ({"keep_rate": 1.0}, {"tokens": GRID}):
            pruneattn.patch(model, **kwargs)
            got = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
            torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


def test_keep_rate_gives_ceil_of_patches(cpu_backend):
    model = llava()
    pruneattn.patch(model, keep_rate=0.3)  # ceil(0.3 * 16) = 5
    full, _ = counts(model, 5, "drop")
    _, ids, mask = caller_prompt([1], full, left=True)
    model(input_ids=ids, attention_mask=mask, pixel_values=pixels_for(1))
    assert pruneattn.kept_indices(model)[feature_block(model)].shape == (1, 5)


# ----------------------------------------------------------------------------- training


def test_training_step_loss_and_gradients(cpu_backend):
    model = llava()
    model.train()
    ref = copy.deepcopy(model)
    full, kept = counts(model, 5, "fuse")
    _, ids, mask = caller_prompt([1, 2, 0], full, left=False)
    labels = torch.where(mask.bool() & (ids != IMAGE), ids, -100)
    pixels = pixels_for(3)
    pruneattn.patch(model, tokens=5, mode="fuse")
    loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
    loss.backward()
    feats, _ = reference_features(ref, pixels, 5, "fuse", "cls", feature_block(ref))
    unpadded = [r[m.bool()].tolist() for r, m in zip(ids, mask)]
    sids, smask, slab = short_prompt(unpadded, full, kept, False, [r[m.bool()].tolist() for r, m in zip(labels, mask)])
    hook = ReplaceProjectorInput(ref, feats)
    expect = ref(input_ids=sids, attention_mask=smask, pixel_values=pixels, labels=slab).loss
    hook.handle.remove()
    expect.backward()
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-6)
    params = dict(ref.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        if "vision_tower" in name or "multi_modal_projector" in name:
            q = params[name]
            if q.grad is None:
                assert p.grad is None or not p.grad.any(), name
                continue
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
            checked += int(q.grad.abs().sum() > 0)
    assert checked > 10  # gradients reached the tower's blocks and the projector


# ----------------------------------------------------------------------------- generate


def generate_both(model, ref, images_per_row, k, mode, left, **gen):
    full, kept = counts(model, k, mode)
    rows, ids, mask = caller_prompt(images_per_row, full, left)
    pixels = pixels_for(sum(images_per_row))
    feats, _ = reference_features(ref, pixels, k, mode, "cls" if isinstance(base_of(ref).config.vision_config, CLIPVisionConfig) else "mean", feature_block(ref))
    sids, smask, _ = short_prompt([r[m.bool()].tolist() for r, m in zip(ids, mask)], full, kept, left)
    torch.manual_seed(11)
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **gen)
    hook = ReplaceProjectorInput(ref, feats)
    torch.manual_seed(11)
    expect = ref.generate(input_ids=sids, attention_mask=smask, pixel_values=pixels, **gen)
    hook.handle.remove()
    seq = out if isinstance(out, torch.Tensor) else out.sequences
    exp = expect if isinstance(expect, torch.Tensor) else expect.sequences
    repeats = seq.shape[0] // ids.shape[0]
    assert torch.equal(seq[:, : ids.shape[1]], ids.repeat_interleave(repeats, 0))  # the caller's prompt as passed
    assert torch.equal(seq[:, ids.shape[1]:], exp[:, sids.shape[1]:])  # then the same new tokens
    return seq


GENERATION = [
    {"max_new_tokens": 5, "do_sample": False},
    {"max_new_tokens": 5, "do_sample": False, "use_cache": False},
    {"max_new_tokens": 4, "num_beams": 3, "num_return_sequences": 2, "do_sample": False},
    {"max_new_tokens": 5, "do_sample": True, "top_k": 10},
    {"max_new_tokens": 5, "do_sample": False, "cache_implementation": "static"},
    {"max_new_tokens": 4, "do_sample": False, "return_dict_in_generate": True, "output_scores": True},
]


@pytest.mark.parametrize("gen", GENERATION, ids=["greedy", "no_cache", "beam", "sample", "static", "dict"])
def test_llava_generate(cpu_backend, gen):
    model = llava()
    ref = copy.deepcopy(model)
    pruneattn.patch(model, tokens=5)
    generate_both(model, ref, [0, 1, 2], 5, "drop", True, min_new_tokens=gen["max_new_tokens"], **gen)


@pytest.mark.parametrize("gen", GENERATION[:2] + GENERATION[4:5], ids=["greedy", "no_cache", "static"])
def test_paligemma_generate(cpu_backend, gen):
    model = paligemma()
    ref = copy.deepcopy(model)
    pruneattn.patch(model, tokens=4, mode="fuse")
    generate_both(model, ref, [1, 1], 4, "fuse", True, min_new_tokens=gen["max_new_tokens"], **gen)


def test_generate_max_length_counts_the_callers_prompt(cpu_backend):
    model = llava()
    pruneattn.patch(model, tokens=3)
    full, _ = counts(model, 3, "drop")
    _, ids, mask = caller_prompt([1], full, left=True)
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels_for(1),
                         max_length=ids.shape[1] + 4, min_length=ids.shape[1] + 4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)


def test_compiled_language_model(cpu_backend):
    model = llava()
    full, _ = counts(model, 5, "drop")
    _, ids, mask = caller_prompt([1, 2], full, left=True)
    pixels = pixels_for(3)
    pruneattn.patch(model, tokens=5)
    eager = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    torch._dynamo.reset()
    model.model.language_model.compile(backend="aot_eager", fullgraph=True)
    try:
        got = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        greedy = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3, do_sample=False)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    assert greedy.shape == (2, ids.shape[1] + 3)


# ----------------------------------------------------------------------------- patch, unpatch, refusals


def test_unpatch_restores_and_state_dict_unchanged(cpu_backend):
    model = llava()
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    pruneattn.patch(model, tokens=5)
    assert list(model.state_dict()) == keys
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    pruneattn.unpatch(model)
    assert type(model) is LlavaForConditionalGeneration
    full, _ = counts(model, GRID, "drop")
    _, ids, mask = caller_prompt([1, 2], full, left=True)
    pixels = pixels_for(3)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits,
                               ref(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, rtol=0, atol=0)
    assert not any(k.startswith("_pruneattn") for m in model.modules() for k in m.__dict__)
    assert not model._forward_pre_hooks and not base_of(model)._forward_pre_hooks


def test_hidden_states_have_the_shortened_length(cpu_backend):
    model = llava()
    pruneattn.patch(model, tokens=5)
    full, kept = counts(model, 5, "drop")
    _, ids, mask = caller_prompt([1, 2], full, left=True)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels_for(3), output_hidden_states=True,
                return_dict=True)
    length = max(len(r) for r in short_prompt([r[m.bool()].tolist() for r, m in zip(ids, mask)], full, kept, True)[0])
    assert all(h.shape[1] == length for h in out.hidden_states)
    tower = out.image_outputs.hidden_states
    assert tower[feature_block(model)].shape[1] == 1 + GRID and tower[feature_block(model) + 1].shape[1] == 1 + kept


def test_text_only_calls_are_untouched(cpu_backend):
    model = llava()
    ref = copy.deepcopy(model)
    pruneattn.patch(model, tokens=5)
    ids = torch.randint(3, 90, (2, 7))
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)


def _classes(model):
    return [type(m) for m in model.modules()]


def test_refusals_name_the_class_and_touch_nothing():
    from transformers import Dinov2Config, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=100)
    nxt = LlavaNextForConditionalGeneration(LlavaNextConfig(vision_config=clip_tower(), text_config=text, image_token_id=IMAGE))
    before = _classes(nxt)
    with pytest.raises(TypeError, match="LlavaNextForConditionalGeneration.*tiles"):
        pruneattn.patch(nxt, tokens=4)
    assert _classes(nxt) == before
    dino = Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    other = LlavaForConditionalGeneration(LlavaConfig(vision_config=dino, text_config=text, image_token_id=IMAGE))
    before = _classes(other)
    with pytest.raises(TypeError, match="Dinov2Model vision tower"):
        pruneattn.patch(other, tokens=4)
    assert _classes(other) == before


@pytest.mark.parametrize("kwargs,error,match", [
    ({"tokens": GRID + 1}, ValueError, "tokens=17 is more than the 16 patches"),
    ({"tokens": 4, "keep_rate": 0.5}, ValueError, "either keep_rate or tokens"),
    ({"tokens": 0}, ValueError, "tokens must be >= 1"),
    ({"tokens": 2.5}, TypeError, "tokens must be an int"),
    ({"tokens": 4, "layers": [3]}, ValueError, "at or before it"),
    ({"tokens": 4, "query": "cls"}, None, None),
])
def test_bad_arguments_raise_before_any_change(kwargs, error, match):
    model = llava()
    before = _classes(model)
    if error is None:
        pruneattn.patch(model, **kwargs)
        return
    with pytest.raises(error, match=match):
        pruneattn.patch(model, **kwargs)
    assert _classes(model) == before and not base_of(model)._forward_pre_hooks


def test_siglip_tower_refuses_cls_query():
    model = paligemma()
    with pytest.raises(ValueError, match="class token"):
        pruneattn.patch(model, tokens=4, query="cls")


def test_feature_layer_zero_is_refused():
    model = llava(vision_feature_layer=0)
    with pytest.raises(ValueError, match="embeddings"):
        pruneattn.patch(model, tokens=4)


def test_call_time_settings_the_patch_was_not_made_for(cpu_backend):
    model = llava()
    pruneattn.patch(model, tokens=5)
    full, _ = counts(model, 5, "drop")
    _, ids, mask = caller_prompt([1], full, left=True)
    with pytest.raises(ValueError, match="vision_feature_layer"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels_for(1), vision_feature_layer=-1)
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels_for(1), vision_feature_select_strategy="full")


def test_wrong_placeholder_count_raises(cpu_backend):
    model = llava()
    pruneattn.patch(model, tokens=5)
    full, _ = counts(model, 5, "drop")
    _, ids, mask = caller_prompt([1, 1], full, left=True)
    with pytest.raises(ValueError, match="do not match: the prompts hold 32 image tokens; their 3 images take 48"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels_for(3))


def test_earlier_pruning_blocks(cpu_backend):
    """layers= adds EViT-style pruning before the feature layer: the tower keeps tokens at each block."""
    model = llava(clip_tower(depth=5))
    pruneattn.patch(model, tokens=[10, 4], layers=[1, 3])
    full, _ = counts(model, 4, "drop")
    _, ids, mask = caller_prompt([1, 2], full, left=True)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels_for(3))
    kept = pruneattn.kept_indices(model)
    assert kept[1].shape == (3, 10) and kept[3].shape == (3, 4)
    assert set(kept[3].flatten().tolist()) <= set(kept[1].flatten().tolist()) | set(range(GRID))
    assert out.logits.shape[1] == ids.shape[1] - 2 * (full - 4)


def test_kept_indices_are_per_image_in_batch_order(cpu_backend):
    model = llava()
    pruneattn.patch(model, tokens=5)
    full, _ = counts(model, 5, "drop")
    _, ids, mask = caller_prompt([2, 1], full, left=True)
    pixels = pixels_for(3)
    model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    together = pruneattn.kept_indices(model)[feature_block(model)]
    for i in range(3):
        _, one, m1 = caller_prompt([1], full, left=True)
        model(input_ids=one, attention_mask=m1, pixel_values=pixels[i : i + 1])
        assert torch.equal(pruneattn.kept_indices(model)[feature_block(model)][0], together[i])


def test_save_pretrained_keeps_the_architecture_name(cpu_backend, tmp_path):
    model = llava()
    pruneattn.patch(model, tokens=5)
    model.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.config.architectures == ["LlavaForConditionalGeneration"]
    with torch.no_grad():
        assert math.isclose(float(loaded.lm_head.weight.sum()), float(model.lm_head.weight.sum()), rel_tol=1e-6)


# ----------------------------------------------------------------------------- the prompt alone


def _python_shortening(row: list[int], full: int, kept: int) -> tuple[list[int], list[int]]:
    """The kept tokens of one prompt and their positions (caller position less the placeholders removed
    before it), by walking the list."""
    ids, positions, seen, removed = [], [], 0, 0
    for j, t in enumerate(row):
        if t == IMAGE:
            seen += 1
            if (seen - 1) % full >= kept:
                removed += 1
                continue
        ids.append(t)
        positions.append(j - removed)
    return ids, positions


@pytest.mark.parametrize("side", ["left", "right", "no mask"])
@pytest.mark.parametrize("images_per_row", [[1], [2], [0, 1, 2], [1, 1], [3, 0]])
def test_shortened_prompt_is_the_processors_prompt_with_fewer_placeholders(images_per_row, side):
    """pruneattn's shortening of ids, mask, labels and positions against lists built here."""
    from pruneattn.patch.vlm.layout import shorten

    full, kept = 6, 2
    rows, ids, mask = caller_prompt(images_per_row, full, left=side == "left")
    if side == "no mask":  # rows of one length (more text where fewer images), no attention mask
        n = max(len(r) for r in rows)
        rows = [[7] * (n - len(r)) + r for r in rows]
        ids, mask = torch.tensor(rows), None
    elif ids.shape[0] == 1:
        rows = [ids[0].tolist()]
    cut = shorten(ids == IMAGE, full, kept, sum(images_per_row), mask)
    left = side != "right"
    labels = torch.where(ids == IMAGE, -100, ids)
    sids, smask, slab = short_prompt(rows, full, kept, left, [[-100 if t == IMAGE else t for t in r] for r in rows])
    assert torch.equal(cut.take(ids, PAD), sids)
    assert torch.equal(cut.real, smask.bool())
    assert torch.equal(cut.take(labels, -100), slab)
    assert cut.padded == (len(set(smask.sum(1).tolist())) > 1)
    got = cut.positions(torch.arange(ids.shape[1]).unsqueeze(0))
    for b, row in enumerate(ids.tolist()):
        tokens, positions = _python_shortening(row, full, kept)
        if mask is not None and ids.shape[0] > 1:  # the caller's padding goes (it is padded again)
            positions = [p for p, t in zip(positions, tokens) if t != PAD]
        assert got[b][cut.real[b]].tolist() == positions


def test_one_host_read_for_one_prompt_beyond_the_models_own(cpu_backend, monkeypatch):
    """A single prompt is shortened with one value read back (a sync on a GPU): the placeholder count that
    tells a full prompt from a planned one. The patched forward reads one value more than the unpatched
    model's own placeholder check does."""
    model = llava()
    ref = copy.deepcopy(model)
    full, kept = counts(model, 5, "drop")
    _, ids, mask = caller_prompt([2], full, left=True)
    sids, smask, _ = short_prompt([ids[0].tolist()], full, kept, True)
    pixels = pixels_for(2)
    feats, _ = reference_features(ref, pixels, 5, "drop", "cls", feature_block(ref))
    ReplaceProjectorInput(ref, feats.detach())
    pruneattn.patch(model, tokens=5)
    monkeypatch.setattr(pruneattn.validate, "value_checks", lambda t: False)
    reads = []
    for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _n=name: (reads.append(_n), _real(self, *a))[1])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        patched, reads[:] = list(reads), []
        ref(input_ids=sids, attention_mask=smask, pixel_values=pixels)
        unpatched = list(reads)
    monkeypatch.undo()
    assert len(patched) == len(unpatched) + 1, (patched, unpatched)


def _features(model, pixels):
    """What the model's own ``get_image_features`` hands its forward as ``mm_encoder_outputs``."""
    base = base_of(model)
    if isinstance(base.config, PaliGemmaConfig):
        return base.get_image_features(pixels, return_dict=True)
    return base.get_image_features(pixel_values=pixels, return_dict=True)


@pytest.mark.parametrize("family", ["llava", "paligemma"])
def test_precomputed_image_features_with_the_processors_prompt(cpu_backend, family):
    model = llava() if family == "llava" else paligemma()
    ref = copy.deepcopy(model)
    pruneattn.patch(model, tokens=5)
    full, _ = counts(model, 5, "drop")
    _, ids, mask = caller_prompt([1, 2], full, left=True)
    pixels = pixels_for(3)
    with torch.no_grad():
        expect = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        feats = _features(model, pixels)
        got = model(input_ids=ids, attention_mask=mask, mm_encoder_outputs={"image": feats}).logits
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
        gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
        seq = model.generate(input_ids=ids, attention_mask=mask, mm_encoder_outputs={"image": _features(model, pixels)}, **gen)
        assert torch.equal(seq, model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **gen))
        # Features an unpatched tower computed fill every placeholder: the prompt stays as it is.
        full_feats = _features(ref, pixels)
        got = model(input_ids=ids, attention_mask=mask, mm_encoder_outputs={"image": full_feats}).logits
        torch.testing.assert_close(got, ref(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits,
                                   rtol=1e-5, atol=1e-5)
