"""pruneattn.patch on more Hugging Face vision encoders (ViT-MSN, I-JEPA, ViT-MAE, Chinese-CLIP, OWLv2, GIT,
BLIP-2, AIMv2, InternVL), small configs with random weights, each against an independent eager pruned
forward run in pieces with the model's own modules (model_reference.run_by_parts)."""
from __future__ import annotations

import pytest
import torch
import transformers as T

import pruneattn
from model_reference import Branch, Parts, heads, one_thread, run_by_parts  # noqa: F401 (fixtures)

FP64_TOL = 1e-6
SMALL = dict(hidden_size=64, num_hidden_layers=5, num_attention_heads=4, intermediate_size=128, image_size=32,
             patch_size=8)  # 16 patches, head dim 16
LAYERS, RATES = (1, 3), {1: 0.7, 3: 0.5}

BUILDERS = {
    "vit_msn": lambda: T.ViTMSNModel(T.ViTMSNConfig(**SMALL)),
    "ijepa": lambda: T.IJepaModel(T.IJepaConfig(**SMALL)),
    "vit_mae": lambda: T.ViTMAEModel(T.ViTMAEConfig(**SMALL, mask_ratio=0.0)),
    "chinese_clip": lambda: T.ChineseCLIPVisionModel(T.ChineseCLIPVisionConfig(**SMALL)),
    "owlv2": lambda: T.Owlv2VisionModel(T.Owlv2VisionConfig(**SMALL)),
    "git": lambda: T.GitVisionModel(T.GitVisionConfig(**SMALL)),
    "blip2": lambda: T.Blip2VisionModel(T.Blip2VisionConfig(**SMALL, qkv_bias=True)),
    "aimv2": lambda: T.Aimv2VisionModel(T.Aimv2VisionConfig(**SMALL)),
    "internvl": lambda: T.InternVLVisionModel(T.InternVLVisionConfig(
        **{**SMALL, "image_size": [32, 32], "patch_size": [8, 8]}, use_qk_norm=True, layer_scale_init_value=0.5)),
}
NO_CLASS_TOKEN = {"ijepa", "aimv2"}


def sharpen(model: torch.nn.Module, factor: float = 4.0) -> torch.nn.Module:
    """Scale the q projections so that the random attention differs between patches."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "q_proj", None), torch.nn.Linear):
                m.q_proj.weight.mul_(factor)
            if type(m).__name__ == "Blip2Attention":
                m.qkv.weight[: m.embed_dim].mul_(factor)
            for name in ("q_bias", "v_bias"):
                if isinstance(getattr(m, name, None), torch.nn.Parameter):
                    getattr(m, name).normal_()
    return model


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = BUILDERS[name]()
    with torch.no_grad():  # weights of a common scale (BLIP-2 initializes with std 1e-10), layer scales and
        for n, p in model.named_parameters():  # biases away from their initial constants
            if p.dim() >= 2:
                p.normal_(0, 0.05)
            elif "lambda" in n or n.endswith("bias"):
                p.uniform_(-0.5, 1.0)
    return sharpen(model).eval()


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def call_kw(name: str, x: torch.Tensor) -> dict:
    """ViT-MAE shuffles the patches by random noise: the same noise for every call of a test."""
    if name != "vit_mae":
        return {}
    return {"noise": torch.rand(x.shape[0], 16, generator=torch.Generator().manual_seed(3)).to(x.dtype)}


def encoder(model):
    """The module holding embeddings and encoder (test side: by attribute names)."""
    return getattr(model, "vision_model", None) or model


def layers_of(enc):
    if hasattr(enc, "layers"):  # ViT-like models hold their layers directly
        return enc.layers
    return enc.encoder.layers if hasattr(enc.encoder, "layers") else enc.encoder.layer


def parts(layer) -> Parts:
    name = type(layer).__name__
    if name == "Blip2EncoderLayer":
        a = layer.self_attn

        def qkv(h):
            B, N, C = h.shape
            return tuple(a.qkv(h).reshape(B, N, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4))

        return Parts([Branch(layer.layer_norm1, qkv, lambda o, h: a.projection(o))], a.scale,
                     lambda x: layer.mlp(layer.layer_norm2(x)))
    if hasattr(layer, "self_attn"):  # CLIP-like
        a = layer.self_attn
        qkv = lambda h: tuple(heads(p(h), a.head_dim) for p in (a.q_proj, a.k_proj, a.v_proj))  # noqa: E731
        return Parts([Branch(layer.layer_norm1, qkv, lambda o, h: a.out_proj(o))], a.scale,
                     lambda x: layer.mlp(layer.layer_norm2(x)))
    if name == "Aimv2EncoderLayer":
        a = layer.attention
        qkv = lambda h: tuple(heads(p(h), a.head_dim) for p in (a.q_proj, a.k_proj, a.v_proj))  # noqa: E731
        return Parts([Branch(layer.rms_norm1, qkv, lambda o, h: a.out_proj(o))], a.scale,
                     lambda x: layer.ffn(layer.rms_norm2(x)))
    if name == "InternVLVisionLayer":
        a = layer.attention
        qkv = lambda h: (heads(a.q_norm(a.q_proj(h)), a.head_dim), heads(a.k_norm(a.k_proj(h)), a.head_dim),  # noqa: E731
                         heads(a.v_proj(h), a.head_dim))
        return Parts([Branch(layer.layernorm_before, qkv, lambda o, h: layer.lambda_1 * a.projection_layer(o))],
                     a.scale, lambda x: layer.lambda_2 * layer.mlp(layer.layernorm_after(x)))
    a = layer.attention  # ViT-like
    qkv = lambda h: tuple(heads(p(h), a.head_dim) for p in (a.q_proj, a.k_proj, a.v_proj))  # noqa: E731
    return Parts([Branch(layer.layernorm_before, qkv, lambda o, h: a.o_proj(o))], a.scaling,
                 lambda x: layer.mlp(layer.layernorm_after(x)))


def embed(enc, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    out = enc.embeddings(x, noise=noise) if noise is not None else enc.embeddings(x)
    tokens = out[0] if isinstance(out, tuple) else out
    for name in ("pre_layrnorm", "pre_layernorm"):
        if hasattr(enc, name):
            tokens = getattr(enc, name)(tokens)
    return tokens


def patched_tokens(model, x: torch.Tensor, **kw) -> torch.Tensor:
    out = model(pixel_values=x, output_hidden_states=True, **kw)
    return out.hidden_states[-1]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_keep_rate_one_matches_unpatched(cpu_backend, name):
    model = build(name)
    x = images()
    kw = call_kw(name, x)
    with torch.no_grad():
        ref = model(pixel_values=x, output_hidden_states=True, **kw)
        pruneattn.patch(model, keep_rate=1.0, layers=range(5))
        out = model(pixel_values=x, output_hidden_states=True, **kw)
    for key in ("last_hidden_state", "pooler_output"):
        if getattr(ref, key, None) is not None:
            torch.testing.assert_close(getattr(out, key), getattr(ref, key), rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("mode,stat", [("drop", "var"), ("fuse", "mad")])
def test_pruned_matches_reference(cpu_backend, name, mode, stat):
    model = build(name).double()
    x = images().double()
    query = "mean" if name in NO_CLASS_TOKEN else "cls"
    enc = encoder(model)
    kw = call_kw(name, x)
    with torch.no_grad():
        tokens = embed(enc, x, **kw)
        ref, trace = run_by_parts(tokens, layers_of(enc), parts, RATES, num_prefix=tokens.shape[1] - 16,
                                  stat=stat, query=query, mode=mode)
        pruneattn.patch(model, keep_rate=[RATES[i] for i in LAYERS], layers=LAYERS, stat=stat, mode=mode)
        out = patched_tokens(model, x, **kw)
        model(pixel_values=x, **kw)  # the model's own heads and poolers run on the pruned tokens
    torch.testing.assert_close(out, ref, rtol=FP64_TOL, atol=FP64_TOL)
    kept = pruneattn.kept_indices(model)
    assert kept.keys() == trace.kept.keys()
    # ViT-MAE shuffles the patches (mask_ratio 0 keeps them all): grid positions through the shuffle
    shuffle = kw["noise"].argsort(dim=1) if kw else None
    for i in kept:
        assert torch.equal(kept[i], trace.kept[i] if shuffle is None else shuffle.gather(1, trace.kept[i])), i


def test_vit_mae_random_masking_kept_indices_index_the_grid(cpu_backend):
    """With MAE's masking on, kept indices point into the full 4 x 4 grid: the kept tokens are the
    embeddings (without masking) of those grid positions, after the blocks."""
    torch.manual_seed(0)
    model = sharpen(T.ViTMAEModel(T.ViTMAEConfig(**SMALL, mask_ratio=0.5))).eval().double()
    x = images().double()
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(3)).double()
    enc = encoder(model)
    with torch.no_grad():
        tokens = embed(enc, x, noise=noise)  # class token + 8 shuffled patches
        ref, trace = run_by_parts(tokens, layers_of(enc), parts, {1: 0.5}, num_prefix=1)
        pruneattn.patch(model, keep_rate=0.5, layers=(1,))
        out = model(pixel_values=x, noise=noise, output_hidden_states=True).hidden_states[-1]
        kept = pruneattn.kept_indices(model)[1]
    torch.testing.assert_close(out, ref, rtol=FP64_TOL, atol=FP64_TOL)
    shuffle = noise.argsort(dim=1)[:, :8]  # MAE keeps the patches of lowest noise
    assert torch.equal(kept, shuffle.gather(1, trace.kept[1]))
    assert kept.shape == (2, 4) and int(kept.max()) < 16


def test_patch_finds_the_vision_side_of_dual_models():
    torch.manual_seed(0)
    model = T.ChineseCLIPModel(T.ChineseCLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99),
        vision_config=SMALL, projection_dim=16)).eval()
    pruneattn.patch(model, keep_rate=0.5, layers=(1,))
    assert hasattr(model.vision_model.encoder.layers[1], "_pruneattn")
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=images())
    assert getattr(feats, "pooler_output", feats).shape[-1] == 16


@pytest.mark.parametrize("cls,cfg,match", [
    (T.BeitModel, T.BeitConfig, "relative position bias"),
    (T.Data2VecVisionModel, T.Data2VecVisionConfig, "relative position bias"),
    (T.ViTMAEForPreTraining, T.ViTMAEConfig, "decoder"),
])
def test_refused_with_a_reason(cls, cfg, match):
    torch.manual_seed(0)
    model = cls(cfg(**SMALL))
    before = [type(m) for m in model.modules()]
    with pytest.raises(TypeError, match=f"{cls.__name__}.*{match}"):
        pruneattn.patch(model)
    assert [type(m) for m in model.modules()] == before


@pytest.mark.parametrize("name", list(BUILDERS))
def test_triton_kernels_in_each_family(device, name):
    """The default backend (the Triton kernels; the interpreter on the CPU), float32, against the reference."""
    model = build(name).to(device)
    x = images().to(device)
    query = "mean" if name in NO_CLASS_TOKEN else "cls"
    enc = encoder(model)
    kw = {k: v.to(device) for k, v in call_kw(name, x).items()}
    with torch.no_grad():
        tokens = embed(enc, x, **kw)
        ref, trace = run_by_parts(tokens, layers_of(enc), parts, RATES, num_prefix=tokens.shape[1] - 16,
                                  query=query, mode="fuse")
        pruneattn.patch(model, keep_rate=[RATES[i] for i in LAYERS], layers=LAYERS, mode="fuse")
        out = patched_tokens(model, x, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- DINOv3: rotary tables follow


def dinov3(registers: int = 2, gated: bool = False, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = T.DINOv3ViTConfig(**SMALL, num_register_tokens=registers, use_gated_mlp=gated, layerscale_value=0.5)
    return sharpen(T.DINOv3ViTModel(cfg)).eval()


def dinov3_parts(layer) -> Parts:
    a = layer.attention
    qkv = lambda h: tuple(heads(p(h), a.head_dim) for p in (a.q_proj, a.k_proj, a.v_proj))  # noqa: E731
    return Parts([Branch(layer.norm1, qkv, lambda o, h: layer.layer_scale1(a.o_proj(o)))], a.scaling,
                 lambda x: layer.layer_scale2(layer.mlp(layer.norm2(x))), rotate_half=True)


def dinov3_reference(model, x, rates, **kw):
    tokens = model.embeddings(x)
    cos, sin = model.rope_embeddings(x)
    table = torch.cat([sin, cos], dim=-1)  # timm's layout: sin halves, then cos halves
    return run_by_parts(tokens, model.model.layer, dinov3_parts, rates, num_prefix=tokens.shape[1] - 16,
                        rope=table, **kw)


@pytest.mark.parametrize("mode,stat,gated", [("drop", "var", False), ("fuse", "mad", True), ("fuse", "var", False)])
def test_dinov3_pruned_matches_reference(cpu_backend, mode, stat, gated):
    """Every block after a pruning block rotates each kept patch by its original grid position."""
    model = dinov3(gated=gated).double()
    x = images().double()
    rates = {1: 0.7, 2: 0.5, 4: 0.7}
    with torch.no_grad():
        ref, trace = dinov3_reference(model, x, rates, stat=stat, mode=mode)
        pruneattn.patch(model, keep_rate=list(rates.values()), layers=list(rates), stat=stat, mode=mode)
        out = model(pixel_values=x, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-1], ref, rtol=FP64_TOL, atol=FP64_TOL)
    torch.testing.assert_close(out.last_hidden_state, model.norm(ref), rtol=FP64_TOL, atol=FP64_TOL)
    kept = pruneattn.kept_indices(model)
    assert kept.keys() == trace.kept.keys() and all(torch.equal(kept[i], trace.kept[i]) for i in kept)


def test_dinov3_keep_one_unpatch_and_checkpointing(cpu_backend):
    model = dinov3()
    x = images()
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state
        pruneattn.patch(model, keep_rate=1.0, layers=(0, 2, 4))
        torch.testing.assert_close(model(pixel_values=x).last_hidden_state, ref, rtol=1e-5, atol=1e-5)
        pruneattn.unpatch(model)
        assert all(type(layer) is T.models.dinov3_vit.modeling_dinov3_vit.DINOv3ViTLayer for layer in model.model.layer)
        torch.testing.assert_close(model(pixel_values=x).last_hidden_state, ref, rtol=0, atol=0)
    # activation checkpointing: the backward's recompute reuses the gathered tables
    plain = dinov3().train()
    ckpt = dinov3().train()
    ckpt.activation_checkpointing_enable()
    grads = []
    for m in (plain, ckpt):
        pruneattn.patch(m, keep_rate=0.5, layers=(1, 3), mode="fuse")
        torch.manual_seed(5)  # the same random rotary augmentation (train mode) for both
        m(pixel_values=x).last_hidden_state.square().mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


def test_dinov3_triton_kernels(device):
    model = dinov3().to(device)
    x = images().to(device)
    with torch.no_grad():
        ref, _ = dinov3_reference(model, x, {1: 0.7, 3: 0.5}, mode="fuse")
        pruneattn.patch(model, keep_rate=[0.7, 0.5], layers=(1, 3), mode="fuse")
        out = model(pixel_values=x, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [*BUILDERS, "dinov3"])
def test_compiles_without_graph_breaks(cpu_backend, name):
    """Each family compiles as one graph (Dynamo, eager backend) and gives the eager outputs."""
    model = dinov3() if name == "dinov3" else build(name)
    pruneattn.patch(model, keep_rate=0.5, layers=LAYERS)
    x = images()
    kw = call_kw(name, x)
    with torch.no_grad():
        eager = model(pixel_values=x, **kw).last_hidden_state
        torch._dynamo.reset()
        run = torch.compile(lambda t: model(pixel_values=t, **kw).last_hidden_state, fullgraph=True, backend="eager")
        torch.testing.assert_close(run(x), eager)
