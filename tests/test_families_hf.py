"""pruneattn.patch on Hugging Face CLIP, SigLIP and DINOv2 vision encoders (small configs, random weights),
each against an independent eager pruned forward run in pieces (model_reference.run_by_parts)."""
from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
    SiglipConfig,
    SiglipForImageClassification,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

import pruneattn
from model_reference import Branch, Parts, heads, kernel_device, one_thread, run_by_parts  # noqa: F401 (fixtures)

FP64_TOL = 1e-6
SMALL = dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=128, image_size=32,
             patch_size=8)  # 16 patches, head dim 16
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=99)
LAYERS, RATES = (1, 3, 4), {1: 0.7, 3: 0.5, 4: 0.7}


def sharpen(model: torch.nn.Module, factor: float = 4.0) -> torch.nn.Module:
    """Scale q/k projections: with the small random init the attention is nearly uniform and the
    scores would not tell patches apart."""
    with torch.no_grad():
        for m in model.modules():
            for name in ("q_proj", "k_proj"):
                lin = getattr(m, name, None)
                if isinstance(lin, torch.nn.Linear):
                    lin.weight.mul_(factor)
    return model


BUILDERS = {
    "clip": lambda: CLIPVisionModel(CLIPVisionConfig(**SMALL)),
    "clip_projection": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**SMALL, projection_dim=16)),
    "clip_model": lambda: CLIPModel(CLIPConfig(text_config=TEXT, vision_config=SMALL, projection_dim=16)),
    "siglip": lambda: SiglipVisionModel(SiglipVisionConfig(**SMALL)),
    "siglip_model": lambda: SiglipModel(SiglipConfig(text_config=TEXT, vision_config=SMALL)),
    "dinov2": lambda: Dinov2Model(Dinov2Config(**SMALL, layerscale_value=0.5)),
    "dinov2_swiglu_cls": lambda: Dinov2ForImageClassification(
        Dinov2Config(**SMALL, use_swiglu_ffn=True, num_labels=10)),
    "dinov2_registers": lambda: Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**SMALL, num_register_tokens=4)),
    "dinov2_registers_cls": lambda: Dinov2WithRegistersForImageClassification(
        Dinov2WithRegistersConfig(**SMALL, num_register_tokens=4, num_labels=10)),
    "siglip_cls": lambda: SiglipForImageClassification(SiglipConfig(text_config=TEXT, vision_config=SMALL, num_labels=10)),
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return sharpen(BUILDERS[name]()).eval()


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def vision(model):
    """The vision encoder of ``model`` (test side: by attribute names)."""
    return getattr(model, "vision_model", None) or getattr(model, "dinov2", None) or model


def outputs(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each model hands its users: tokens, pooled features or logits."""
    if isinstance(model, (CLIPModel, SiglipModel)):
        feats = model.get_image_features(pixel_values=x)
        return {"image_features": getattr(feats, "pooler_output", feats)}
    out = model(pixel_values=x)
    keys = ("last_hidden_state", "pooler_output", "image_embeds", "logits")
    return {k: out[k] for k in keys if k in out and out[k] is not None}


# ----------------------------------------------------------------------------- reference pieces


def parts(layer) -> Parts:
    if hasattr(layer, "self_attn"):  # CLIP / SigLIP
        a = layer.self_attn
        qkv = lambda h: tuple(heads(p(h), a.head_dim) for p in (a.q_proj, a.k_proj, a.v_proj))  # noqa: E731
        return Parts([Branch(layer.layer_norm1, qkv, lambda o, h: a.out_proj(o))], a.scale,
                     lambda x: layer.mlp(layer.layer_norm2(x)))
    a = layer.attention  # DINOv2
    qkv = lambda h: tuple(heads(p(h), a.head_dim) for p in (a.q_proj, a.k_proj, a.v_proj))  # noqa: E731
    return Parts([Branch(layer.norm1, qkv, lambda o, h: layer.layer_scale1(a.o_proj(o)))], a.scaling,
                 lambda x: layer.layer_scale2(layer.mlp(layer.norm2(x))))


def reference_tokens(model, x: torch.Tensor, keep_rates, **kw):
    """Encoder output tokens (before any final norm) with the spec's pruning, and the trace."""
    enc = vision(model)
    tokens = enc.embeddings(x)
    if hasattr(enc, "pre_layrnorm"):
        tokens = enc.pre_layrnorm(tokens)
    layers = enc.encoder.layers if hasattr(enc.encoder, "layers") else enc.encoder.layer
    prefix = tokens.shape[1] - 16
    return run_by_parts(tokens, layers, parts, keep_rates, num_prefix=prefix, **kw)


def patched_tokens(model, x: torch.Tensor) -> torch.Tensor:
    """Encoder output tokens of the (patched) model, before any final norm, through its own forward."""
    enc = vision(model)
    out = enc(pixel_values=x, output_hidden_states=True)
    return out.hidden_states[-1]


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_keep_rate_one_matches_unpatched(cpu_backend, name, attn):
    """Same outputs as unpatched; with "sdpa" to 1e-5, with "eager" (another float32 summation order
    for the softmax, amplified through six layers of sharpened attention) to 1e-4."""
    tol = 1e-5 if attn == "sdpa" else 1e-4
    model = build(name)
    model.set_attn_implementation(attn)
    x = images()
    with torch.no_grad():
        ref = outputs(model, x)
        pruneattn.patch(model, keep_rate=1.0, layers=range(6))
        out = outputs(model, x)
    assert ref and out.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=tol, atol=tol, msg=k)


@pytest.mark.parametrize("name", ["clip", "siglip", "dinov2", "dinov2_swiglu_cls", "dinov2_registers"])
@pytest.mark.parametrize("mode,stat", [("drop", "var"), ("fuse", "mad")])
def test_pruned_matches_reference(cpu_backend, name, mode, stat):
    model = build(name).double()
    x = images().double()
    query = "mean" if name == "siglip" else "cls"
    with torch.no_grad():
        ref, trace = reference_tokens(model, x, RATES, stat=stat, query=query, mode=mode)
        pruneattn.patch(model, keep_rate=[RATES[i] for i in LAYERS], layers=LAYERS, stat=stat, mode=mode)
        out = patched_tokens(model, x)
        outputs(model, x)  # the model's own heads run on the pruned tokens
    torch.testing.assert_close(out, ref, rtol=FP64_TOL, atol=FP64_TOL)
    kept = pruneattn.kept_indices(model)
    assert kept.keys() == trace.kept.keys()
    for i in kept:
        assert torch.equal(kept[i], trace.kept[i]), i


def test_heads_read_the_pruned_tokens(cpu_backend):
    """SigLIP's attention-pooling head and DINOv2's classifier pool the kept (and fused) tokens."""
    siglip, dino = build("siglip").double(), build("dinov2_swiglu_cls").double()
    x = images().double()
    with torch.no_grad():
        s_ref, _ = reference_tokens(siglip, x, RATES, query="mean", mode="fuse")
        d_ref, _ = reference_tokens(dino, x, RATES, mode="fuse")
        for m in (siglip, dino):
            pruneattn.patch(m, keep_rate=[RATES[i] for i in LAYERS], layers=LAYERS, mode="fuse")
        pooled = siglip(pixel_values=x).pooler_output
        logits = dino(pixel_values=x).logits
    torch.testing.assert_close(pooled, siglip.head(siglip.post_layernorm(s_ref)), rtol=FP64_TOL, atol=FP64_TOL)
    seq = dino.dinov2.layernorm(d_ref)
    want = dino.classifier(torch.cat([seq[:, 0], seq[:, 1:].mean(dim=1)], dim=1))
    torch.testing.assert_close(logits, want, rtol=FP64_TOL, atol=FP64_TOL)


def test_query_default_and_prefix_per_model():
    siglip, clip, reg = build("siglip_model"), build("clip_model"), build("dinov2_registers")
    for m in (siglip, clip, reg):
        pruneattn.patch(m, layers=(1,))
    assert vision(siglip).encoder.layers[1]._pruneattn.query == "mean"
    assert vision(siglip).encoder.layers[1]._pruneattn.num_prefix == 0
    assert vision(clip).encoder.layers[1]._pruneattn.query == "cls"
    assert reg.encoder.layer[1]._pruneattn.num_prefix == 5  # class token + 4 registers
    # the text towers are untouched
    assert not any(hasattr(m, "_pruneattn") for m in clip.text_model.modules())
    assert not any(hasattr(m, "_pruneattn") for m in siglip.text_model.modules())
    with pytest.raises(ValueError, match="class token"):
        pruneattn.patch(siglip, layers=(1,), query="cls")


def test_default_layers_follow_encoder_depth():
    model = CLIPVisionModel(CLIPVisionConfig(**{**SMALL, "num_hidden_layers": 24})).eval()
    pruneattn.patch(model)
    assert [i for i, m in enumerate(model.encoder.layers) if hasattr(m, "_pruneattn")] == [6, 12, 18]


def test_hidden_states_have_pruned_lengths(cpu_backend):
    model = build("clip")
    pruneattn.patch(model, keep_rate=0.5, layers=(1, 3), mode="fuse")
    with torch.no_grad():
        out = model(pixel_values=images(), output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [17, 17, 10, 10, 6, 6, 6]


def test_gradients_match_reference(cpu_backend):
    model, ref_model = build("clip").double().train(), build("clip").double().train()
    x = images().double()
    tokens, _ = reference_tokens(ref_model, x, {1: 0.7, 3: 0.5}, mode="fuse", detach_fuse_weights=True)
    (ref_model.post_layernorm(tokens[:, 0]) ** 2).sum().backward()
    pruneattn.patch(model, keep_rate=[0.7, 0.5], layers=(1, 3), mode="fuse")
    (model(pixel_values=x).pooler_output ** 2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in ref_model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and len(grads) > 20
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-6, atol=1e-8, msg=n)


@pytest.mark.parametrize("name", ["clip", "siglip", "dinov2_registers"])
def test_triton_kernels_match_reference(kernel_device, name):
    model = build(name).to(kernel_device)
    x = images().to(kernel_device)
    query = "mean" if name == "siglip" else "cls"
    with torch.no_grad():  # the reference in float64; float32 noise grows through sharpened layers
        ref, trace = reference_tokens(build(name).double(), x.double().cpu(), RATES, query=query, mode="fuse")
        pruneattn.patch(model, keep_rate=[RATES[i] for i in LAYERS], layers=LAYERS, mode="fuse")
        assert pruneattn.backend_for(x.device) == "triton"
        out = patched_tokens(model, x)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-4, atol=1e-3)
    for i, idx in pruneattn.kept_indices(model).items():
        assert torch.equal(idx.cpu(), trace.kept[i])


def test_autocast_bfloat16(cpu_backend):
    model = build("dinov2")
    pruneattn.patch(model, keep_rate=0.5, layers=LAYERS, mode="fuse")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixel_values=images()).last_hidden_state
    assert out.shape == (2, 1 + 3, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["siglip", "dinov2_registers"])
def test_compiles_without_graph_breaks(cpu_backend, name):
    model = build(name)
    pruneattn.patch(model, keep_rate=0.5, layers=(1, 3), mode="fuse")
    x = images()
    with torch.no_grad():
        eager = model(pixel_values=x).last_hidden_state
        torch._dynamo.reset()
        compiled = torch.compile(lambda t: model(pixel_values=t).last_hidden_state, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(compiled, eager)
