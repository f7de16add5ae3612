"""pruneattn.patch on timm's modern ViT families (Eva: EVA02, RoPE ViTs, DINOv3; parallel and post-norm
VisionTransformer blocks), each against an independent eager pruned forward run in pieces
(model_reference.run_by_parts: plain attention matrices, the rotary table indexed per image)."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models.eva import Eva, EvaBlock, EvaBlockPostNorm
from timm.models.vision_transformer import ParallelScalingBlock, ParallelThingsBlock, ResPostBlock, VisionTransformer

import pruneattn
from model_reference import Branch, Parts, heads, kernel_device, one_thread, run_by_parts  # noqa: F401 (fixtures)

FP64_TOL = 1e-6  # scores and fuse weights are float32 by the spec

# name -> create_model kwargs: small grids (16 to 25 patches), random weights
EVA_MODELS = {
    "eva02_tiny_patch14_224": dict(img_size=56, depth=6),  # class token, SwiGLU, rope, q/v bias
    "vit_small_patch16_rope_224": dict(img_size=64, depth=6),  # separate q/k/v? fused qkv, layer scale off
    "vit_small_patch16_rope_mixed_224": dict(img_size=64, depth=6),  # one rotary table per block
    "vit_medium_patch16_rope_reg1_gap_256": dict(img_size=64, depth=6, embed_dim=128),  # register, no class token
    "vit_small_patch16_dinov3": dict(img_size=64, depth=6),  # class token + 4 registers, layer scale
}
LAYERS = (1, 3, 4)


def sharpen(model: torch.nn.Module, factor: float = 4.0) -> torch.nn.Module:
    """Scale the q/k projections and set layer scales to 1: with timm's small random init the attention
    is nearly uniform and its branch tiny, and neither the scores nor the rotary positions would matter
    to the tests."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("gamma", "gamma_1", "gamma_2"):
                p.fill_(1.0)
        for m in model.modules():
            for name in ("qkv", "q_proj", "k_proj", "in_proj"):
                lin = getattr(m, name, None)
                if isinstance(lin, torch.nn.Linear):
                    lin.weight.mul_(factor)
    return model


def create(name: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=10, **{**EVA_MODELS.get(name, {}), **kw})
    return sharpen(model).eval()


def images(model, n: int = 2, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    size = model.patch_embed.img_size
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ----------------------------------------------------------------------------- block pieces, from the
# timm modules' weights (independent of pruneattn.patch.timm)


def _qkv(a):
    def qkv(h):
        if a.qkv is not None:
            bias = a.qkv.bias
            if getattr(a, "q_bias", None) is not None:
                bias = torch.cat((a.q_bias, torch.zeros_like(a.q_bias), a.v_bias))
            t = h @ a.qkv.weight.T + (0 if bias is None else bias)
            q, k, v = t.chunk(3, dim=-1)
        else:
            q, k, v = a.q_proj(h), a.k_proj(h), a.v_proj(h)
        q, k, v = (heads(t, a.head_dim) for t in (q, k, v))
        g = getattr(a, "num_kv_groups", 1)  # grouped k/v heads: query head h reads k/v head h // g
        k, v = a.k_norm(k)[:, torch.arange(q.shape[1]) // g], v[:, torch.arange(q.shape[1]) // g]
        return a.q_norm(q), k, v

    return qkv


def _proj(a, o, h):
    o = a.norm(o)
    if getattr(a, "gate", None) is not None:
        o = o * torch.sigmoid(a.gate(h))
    return a.proj(o)


def _scaled(gamma, t):
    return t if gamma is None else gamma * t


def parts(blk) -> Parts:
    ident = lambda t: t  # noqa: E731
    if isinstance(blk, EvaBlock):
        a = blk.attn
        return Parts(
            [Branch(blk.norm1, _qkv(a), lambda o, h: _scaled(blk.gamma_1, _proj(a, o, h)))],
            a.scale, lambda x: _scaled(blk.gamma_2, blk.mlp(blk.norm2(x))), rotate_half=a.rotate_half,
        )
    if isinstance(blk, EvaBlockPostNorm):
        a = blk.attn
        return Parts([Branch(ident, _qkv(a), lambda o, h: blk.norm1(_proj(a, o, h)))], a.scale,
                     lambda x: blk.norm2(blk.mlp(x)), rotate_half=a.rotate_half)
    if isinstance(blk, ResPostBlock):
        a = blk.attn
        return Parts([Branch(ident, _qkv(a), lambda o, h: blk.norm1(_proj(a, o, h)))], a.scale,
                     lambda x: blk.norm2(blk.mlp(x)))
    if isinstance(blk, ParallelScalingBlock):
        def split(x):
            return torch.split(blk.in_proj(blk.in_norm(x)), blk.in_split, dim=-1)

        def qkv(h):
            _, q, k, v = split(h)
            q, k, v = (heads(t, blk.head_dim) for t in (q, k, v))
            return blk.q_norm(q), blk.k_norm(k), v

        def mlp(x):
            m = split(x)[0] + (0 if blk.mlp_bias is None else blk.mlp_bias)
            return blk.ls(blk.mlp_out_proj(blk.mlp_act(m)))

        return Parts([Branch(ident, qkv, lambda o, h: blk.ls(blk.attn_out_proj(o)))], blk.scale, mlp, parallel=True)
    if isinstance(blk, ParallelThingsBlock):
        branches = [Branch(br.norm, _qkv(br.attn), lambda o, h, br=br: br.ls(_proj(br.attn, o, h))) for br in blk.attns]
        return Parts(branches, blk.attns[0].attn.scale, lambda x: sum(f(x) for f in blk.ffns))
    a = blk.attn  # plain Block
    return Parts([Branch(blk.norm1, _qkv(a), lambda o, h: blk.ls1(_proj(a, o, h)))], a.scale,
                 lambda x: blk.ls2(blk.mlp(blk.norm2(x))))


def reference_forward(model, x: torch.Tensor, keep_rates: dict[int, float], **kw):
    """Final features (after the model's last norm, all tokens) of ``model`` with the spec's pruning, every
    block in pieces; ``model.forward_head`` of them gives the logits."""
    tokens = model.patch_embed(x)
    if isinstance(model, Eva):
        tokens, rope = model._pos_embed(tokens)
        kw.update(rope=rope, rope_per_block=bool(model.rope_mixed))
    else:
        tokens = model.patch_drop(model._pos_embed(tokens))
    tokens = model.norm_pre(tokens)
    out, trace = run_by_parts(tokens, model.blocks, parts, keep_rates, num_prefix=model.num_prefix_tokens, **kw)
    return model.norm(out), trace


def _vit(block_fn, **kw):
    torch.manual_seed(0)
    return sharpen(VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=6, num_heads=4, num_classes=10,
                                     block_fn=block_fn, **kw)).eval()


VIT_BLOCKS = {
    "res_post": lambda: _vit(ResPostBlock),
    "parallel_scaling": lambda: _vit(ParallelScalingBlock, qkv_bias=False),
    "parallel_things": lambda: _vit(ParallelThingsBlock, init_values=0.5),
    "eva_post_norm": lambda: sharpen(Eva(img_size=32, patch_size=8, embed_dim=64, depth=6, num_heads=4, num_classes=10,
                                         use_post_norm=True, use_rot_pos_emb=True, qkv_fused=False)).eval(),
    # q/k norm, grouped k/v heads, separate projections, SwiGLU, layer scale, 2 registers, no class token
    "eva_qk_norm_gqa": lambda: sharpen(Eva(
        img_size=32, patch_size=8, embed_dim=64, depth=6, num_heads=4, num_classes=10, attn_type="rope",
        qk_norm=True, num_kv_heads=2, qkv_fused=False, use_rot_pos_emb=True, init_values=0.5, swiglu_mlp=True,
        num_reg_tokens=2, class_token=False, global_pool="avg")).eval(),
}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return VIT_BLOCKS[name]() if name in VIT_BLOCKS else create(name)


ALL = list(EVA_MODELS) + list(VIT_BLOCKS)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", ALL)
def test_keep_rate_one_matches_unpatched(cpu_backend, name):
    model = build(name)
    x = images(model)
    with torch.no_grad():
        ref = model(x)
        pruneattn.patch(model, keep_rate=1.0, layers=range(len(model.blocks)))
        out = model(x)
    assert type(model).__name__.startswith("Pruned")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("mode,stat", [("drop", "var"), ("fuse", "mad")])
def test_pruned_matches_reference(cpu_backend, name, mode, stat):
    model = build(name).double()
    x = images(model).double()
    rates = {1: 0.7, 3: 0.5, 4: 0.7}
    query = "cls" if getattr(model, "cls_token", None) is not None else "mean"
    with torch.no_grad():
        ref, trace = reference_forward(model, x, rates, stat=stat, query=query, mode=mode)
        pruneattn.patch(model, keep_rate=[rates[i] for i in LAYERS], layers=LAYERS, stat=stat, mode=mode)
        out = model.forward_features(x)
        logits = model(x)
    torch.testing.assert_close(out, ref, rtol=FP64_TOL, atol=FP64_TOL)
    torch.testing.assert_close(logits, model.forward_head(ref), rtol=FP64_TOL, atol=1e-9)
    kept = pruneattn.kept_indices(model)
    assert kept.keys() == trace.kept.keys()
    for i in kept:
        assert torch.equal(kept[i], trace.kept[i]), i


def test_rotary_table_follows_the_kept_patches(cpu_backend, monkeypatch):
    """A reference that rotates each token by its slot instead of its grid position gives other logits:
    the patched model matches the gathered table, and this test can tell the two apart."""
    import model_reference

    model = create("vit_small_patch16_rope_224").double()
    x = images(model).double()
    with torch.no_grad():
        right, _ = reference_forward(model, x, {1: 0.5})
        monkeypatch.setattr(model_reference, "rotary_for", lambda t, grid: t if grid is None else t[: grid.shape[1]])
        wrong, _ = reference_forward(model, x, {1: 0.5})
        pruneattn.patch(model, keep_rate=0.5, layers=(1,))
        out = model.forward_features(x)
    torch.testing.assert_close(out, right, rtol=FP64_TOL, atol=FP64_TOL)
    assert (out - wrong).abs().max() > 0.1


def test_gradients_match_reference(cpu_backend):
    """A training step's gradients (RoPE ViT, fuse mode) against the eager reference, float64."""
    model = create("vit_small_patch16_rope_224").double().train()
    x = images(model).double()
    target = torch.tensor([1, 7])
    ref_model = create("vit_small_patch16_rope_224").double().train()
    rates = {1: 0.7, 3: 0.5}
    feats, _ = reference_forward(ref_model, x, rates, mode="fuse", detach_fuse_weights=True)
    torch.nn.functional.cross_entropy(ref_model.forward_head(feats), target).backward()
    pruneattn.patch(model, keep_rate=[0.7, 0.5], layers=(1, 3), mode="fuse")
    torch.nn.functional.cross_entropy(model(x), target).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in ref_model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and len(grads) > 20
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-6, atol=1e-8, msg=n)


def test_patch_leaves_weights_and_unpatch_restores():
    model = create("eva02_tiny_patch14_224")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pruneattn.patch(model, layers=(1, 3))
    assert type(model).__name__ == "PrunedEva" and isinstance(model, Eva)
    assert model.state_dict().keys() == state.keys()
    pruneattn.unpatch(model)
    assert type(model) is Eva and all(type(b) is EvaBlock for b in model.blocks)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_query_defaults_to_mean_without_class_token(cpu_backend):
    model = create("vit_medium_patch16_rope_reg1_gap_256")
    pruneattn.patch(model, layers=(1,))
    assert model.blocks[1]._pruneattn.query == "mean" and model.blocks[1]._pruneattn.num_prefix == 1
    with pytest.raises(ValueError, match="class token"):
        pruneattn.patch(model, layers=(1,), query="cls")


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "vit_small_patch16_dinov3", "parallel_scaling",
                                  "parallel_things", "eva_post_norm"])
def test_triton_kernels_match_reference(kernel_device, name):
    """The patched model through the Triton kernels (the interpreter on a CPU), float32."""
    model = build(name).to(kernel_device)
    x = images(model).to(kernel_device)
    rates = {1: 0.7, 3: 0.5, 4: 0.7}
    with torch.no_grad():  # the reference in float64; float32 noise grows through sharpened layers
        ref, trace = reference_forward(build(name).double(), x.double().cpu(), rates, mode="fuse")
        pruneattn.patch(model, keep_rate=[rates[i] for i in LAYERS], layers=LAYERS, mode="fuse")
        assert pruneattn.backend_for(x.device) == "triton"
        out = model.forward_features(x)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-4, atol=1e-3)
    for i, idx in pruneattn.kept_indices(model).items():
        assert torch.equal(idx.cpu(), trace.kept[i])


def test_autocast_bfloat16(cpu_backend):
    model = create("eva02_tiny_patch14_224")
    x = images(model)
    pruneattn.patch(model, keep_rate=1.0, layers=LAYERS)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    with torch.no_grad():
        ref = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)
    pruneattn.patch(model, keep_rate=0.5, layers=LAYERS, mode="fuse")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        pruned = model(x)
    assert pruned.shape == (2, 10) and torch.isfinite(pruned).all()


def test_compiles_without_graph_breaks(cpu_backend):
    model = create("vit_small_patch16_rope_224")
    x = images(model)
    pruneattn.patch(model, keep_rate=0.5, layers=(1, 3), mode="fuse")
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(compiled, eager)


# ----------------------------------------------------------------------------- intermediates


@pytest.mark.parametrize("name", ["vit_small_patch16_rope_224", "parallel_things"])
def test_intermediates_grid_rule(cpu_backend, name):
    """NCHW intermediates have the grid's shape: kept patches hold their current value, a dropped patch its
    value after the attention residual of the block that dropped it. NLC keeps the pruned length."""
    model = build(name).double()
    x = images(model).double()
    rates = {1: 0.5, 3: 0.5}
    before: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        grid_ref = model.forward_intermediates(x, indices=[0, 2, 5], intermediates_only=True)
        reference_forward(model, x, rates, before_selection=before)
        pruneattn.patch(model, keep_rate=0.5, layers=(1, 3))
        grids = model.forward_intermediates(x, indices=[0, 2, 5], intermediates_only=True)
        seqs = model.forward_intermediates(x, indices=[0, 2, 5], intermediates_only=True, output_fmt="NLC")
        kept = pruneattn.kept_indices(model)
    assert [g.shape for g in grids] == [g.shape for g in grid_ref]
    torch.testing.assert_close(grids[0], grid_ref[0])  # before any pruning: the unpatched value
    assert [s.shape[1] for s in seqs] == [16, 8, 4]
    p = model.num_prefix_tokens
    B, C = x.shape[0], grids[2].shape[1]
    last = grids[2].flatten(2).transpose(1, 2)  # (B, 16, C) after block 5
    for b in range(B):
        for j in range(16):
            if j in kept[3][b]:
                want = seqs[2][b, kept[3][b].tolist().index(j)]
            elif j in kept[1][b]:  # dropped by block 3: its value there, after the attention residual
                want = before[3][b, p + kept[1][b].tolist().index(j)]
            else:  # dropped by block 1
                want = before[1][b, p + j]
            torch.testing.assert_close(last[b, j], want, rtol=FP64_TOL, atol=FP64_TOL)
    assert C == model.embed_dim


def test_get_intermediate_layers(cpu_backend):
    model = _vit(ResPostBlock)
    pruneattn.patch(model, keep_rate=0.5, layers=(1,))
    with torch.no_grad():
        maps = model.get_intermediate_layers(images(model), n=2, reshape=True)
    assert [m.shape for m in maps] == [(2, 64, 4, 4)] * 2


# ----------------------------------------------------------------------------- unsupported families


@pytest.mark.parametrize(
    "name,why",
    [
        ("beit_base_patch16_224", "relative position bias"),
        ("vit_relpos_base_patch16_224", "relative position bias"),
        ("cait_xxs24_224", "class-attention"),
        ("xcit_nano_12_p16_224", "cross-covariance"),
    ],
)
def test_unsupported_families_name_class_and_reason(name, why):
    model = timm.create_model(name, pretrained=False, depth=2, img_size=32) if "xcit" not in name else timm.create_model(name, pretrained=False, depth=2)
    classes = [type(m) for m in model.modules()]
    with pytest.raises(TypeError, match=f"{type(model).__name__}.*{why}"):
        pruneattn.patch(model)
    assert [type(m) for m in model.modules()] == classes


@pytest.mark.parametrize("name", ["vit_small_patch16_rope_224", "eva_qk_norm_gqa"])
def test_peak_memory_no_higher_than_unpatched(cpu_backend, name):
    """Bytes held by torch's CPU allocator at the peak of a forward (deterministic, no timing): the
    patched loop keeps no extra tensor alive (neither the first tokens nor an attention output)."""
    from pruneattn.bench import models as M
    from pruneattn.bench.models_cpu import allocator_peak

    model = build(name)
    x = images(model, n=4)
    unpatched = allocator_peak(model, M.UNPATCHED, x)
    pruneattn.patch(model, keep_rate=0.7, layers=(4,))  # blocks 1 to 4 at full length
    assert allocator_peak(model, M.pruned("var", 0.7, layers=(4,)), x) <= unpatched
