"""pruneattn.patch on open_clip's vision tower (small configs, random weights), against an independent eager
pruned forward run in pieces with the tower's own modules (model_reference.run_by_parts)."""
from __future__ import annotations

import pytest
import torch

import pruneattn
from model_reference import Branch, Parts, one_thread, run_by_parts  # noqa: F401 (fixtures)

open_clip = pytest.importorskip("open_clip")
from open_clip.transformer import VisionTransformer  # noqa: E402

FP64_TOL = 1e-6
RATES = {1: 0.7, 3: 0.5}


def tower(seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    args = dict(image_size=32, patch_size=8, width=64, layers=5, heads=4, mlp_ratio=2.0, output_dim=16)
    model = VisionTransformer(**{**args, **kw}).eval()
    with torch.no_grad():  # sharpen the random attention so that the scores differ between patches
        for block in model.transformer.resblocks:
            block.attn.in_proj_weight[:64].mul_(4.0)
            block.attn.in_proj_bias.uniform_(-0.5, 0.5)
    return model


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def parts(block) -> Parts:
    a = block.attn

    def qkv(h):
        B, N, C = h.shape
        q, k, v = (h @ a.in_proj_weight.T + a.in_proj_bias).reshape(B, N, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        return q, k, v

    return Parts([Branch(block.ln_1, qkv, lambda o, h: block.ls_1(a.out_proj(o)))], a.head_dim ** -0.5,
                 lambda x: block.ls_2(block.mlp(block.ln_2(x))))


def reference(model, x, rates, **kw):
    tokens = model._embeds(x)
    out, trace = run_by_parts(tokens, model.transformer.resblocks, parts, rates, num_prefix=1, **kw)
    pooled, _ = model._pool(out)
    return (pooled @ model.proj if model.proj is not None else pooled), trace


CONFIGS = {
    "class token": {},
    "layer scale, average pool": {"ls_init_value": 0.5, "pool_type": "avg"},
    "attentional pooler": {"attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2},
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("mode,stat", [("drop", "var"), ("fuse", "mad")])
def test_pruned_matches_reference(cpu_backend, name, mode, stat):
    model = tower(**CONFIGS[name]).double()
    x = images().double()
    with torch.no_grad():
        want, trace = reference(model, x, RATES, stat=stat, mode=mode)
        pruneattn.patch(model, keep_rate=list(RATES.values()), layers=list(RATES), stat=stat, mode=mode)
        got = model(x)
    torch.testing.assert_close(got, want, rtol=FP64_TOL, atol=FP64_TOL)
    kept = pruneattn.kept_indices(model)
    assert kept.keys() == trace.kept.keys() and all(torch.equal(kept[i], trace.kept[i]) for i in kept)


def test_keep_one_and_the_whole_clip_model(cpu_backend):
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.encode_image(x)
        pruneattn.patch(model, keep_rate=1.0)
        torch.testing.assert_close(model.encode_image(x), ref, rtol=1e-5, atol=1e-5)
        pruneattn.patch(model, keep_rate=0.7)
        assert model.encode_image(x).shape == ref.shape
        assert [v.shape[1] for v in pruneattn.kept_indices(model).values()] == [35, 25, 18]  # of 49 patches
    assert not any(hasattr(m, "_pruneattn") for m in model.transformer.modules())  # the text tower
    pruneattn.unpatch(model)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), ref, rtol=0, atol=0)


def test_patch_dropout_kept_indices_index_the_grid(cpu_backend):
    model = tower(patch_dropout=0.5).train()
    pruneattn.patch(model, keep_rate=0.5, layers=(1,))
    x = images()
    torch.manual_seed(7)
    model(x)
    kept = pruneattn.kept_indices(model)[1]
    torch.manual_seed(7)
    drawn = torch.randn(2, 16).topk(8, dim=-1).indices  # open_clip's own draw for these 8 of 16 patches
    assert kept.shape == (2, 4)
    assert all(set(kept[b].tolist()) <= set(drawn[b].tolist()) for b in range(2))


def test_triton_kernels(device):
    model = tower(ls_init_value=0.5).to(device)
    x = images().to(device)
    with torch.no_grad():
        want, _ = reference(model, x, RATES, mode="fuse")
        pruneattn.patch(model, keep_rate=list(RATES.values()), layers=list(RATES), mode="fuse")
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_compiles_without_graph_breaks(cpu_backend):
    model = tower()
    pruneattn.patch(model, keep_rate=0.5, layers=(1, 3))
    x = images()
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(x), eager)
