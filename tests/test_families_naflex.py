"""timm ``NaFlexVit``: images of different sizes in one batch (``patch_valid``), with and without rotary
embedding, against each image run ALONE through the eager block-by-block reference of
``test_families_timm`` (plain attention matrices over its real tokens, the rotary table indexed per
image), unpadded and unmasked. Random weights, q / k scaled so that the scores differ."""
import pytest
import torch

import pruneattn
from model_reference import one_thread, run_by_parts  # noqa: F401  (fixture)
from test_families_timm import parts, sharpen

naflexvit = pytest.importorskip("timm.models.naflexvit")

GRIDS = [(8, 8), (5, 7), (1, 1), (2, 3)]  # a full grid, odd counts, one patch


def _model(rope="", dtype=torch.float64, depth=4, pool="avg"):
    torch.manual_seed(0)
    cfg = naflexvit.NaFlexVitCfg(
        patch_size=4, embed_dim=48, depth=depth, num_heads=3, class_token=True, reg_tokens=1, global_pool=pool,
        rope_type=rope, pos_embed="none" if rope else "learned", pos_embed_grid_size=(8, 8),
    )
    return sharpen(naflexvit.NaFlexVit(cfg, num_classes=5)).eval().to(dtype)


def _batch(grids=GRIDS, N=64, dtype=torch.float64):
    """What timm's NaFlex collator gives: patches (B, N, p * p * 3) padded, patch_coord, patch_valid."""
    g = torch.Generator().manual_seed(1)
    B = len(grids)
    patches = torch.zeros(B, N, 4 * 4 * 3, dtype=torch.float64)
    valid = torch.zeros(B, N, dtype=torch.bool)
    coord = torch.zeros(B, N, 2, dtype=torch.long)
    for b, (h, w) in enumerate(grids):
        patches[b, : h * w] = torch.randn(h * w, 48, generator=g, dtype=torch.float64)
        valid[b, : h * w] = True
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        coord[b, : h * w] = torch.stack([yy.flatten(), xx.flatten()], dim=1)
    return {"patches": patches.to(dtype), "patch_coord": coord, "patch_valid": valid}


@pytest.mark.parametrize("rope", ["", "axial", "mixed"])
def test_keep_one_equals_unpatched(rope, cpu_backend):
    model = _model(rope)
    batch = _batch()
    with torch.no_grad():
        want = model(batch)
        pruneattn.patch(model, keep_rate=1.0)
        got = model(batch)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("rope", ["", "axial", "mixed"])
def test_pruned_equals_each_image_alone(rope, cpu_backend):
    model = _model(rope)
    batch = _batch()
    layers, rate = [1, 2], 0.7
    with torch.no_grad():
        embeds = model._forward_embeds(batch["patches"], patch_coord=batch["patch_coord"],
                                       patch_valid=batch["patch_valid"], attn_mask=None)
        tables = embeds["rope_embeds"]
        tables = list(tables) if rope == "mixed" else tables
        pruneattn.patch(model, keep_rate=rate, layers=layers)
        logits = model(batch)
        kept = pruneattn.kept_indices(model)
        features = model.forward_features(**batch)
        npt = model.num_prefix_tokens
        for b, (h, w) in enumerate(GRIDS):
            n = npt + h * w
            tokens = embeds["patches"][b : b + 1, :n]
            kw = {}
            if rope == "axial":
                kw = {"rope": tables[b, 0, : h * w]}
            elif rope == "mixed":
                kw = {"rope": [t[b, :, : h * w] for t in tables], "rope_per_block": True}
            x, trace = run_by_parts(tokens, model.blocks, parts, dict.fromkeys(layers, rate), num_prefix=npt, **kw)
            x = model.norm(x)
            torch.testing.assert_close(logits[b], model.forward_head(x)[0])
            m = x.shape[1]
            torch.testing.assert_close(features["patches"][b, :m], x[0])
            assert features["patch_valid"][b].sum() == m - npt
            for layer in layers:
                want = trace.kept[layer][0].tolist()
                row = kept[layer][b].tolist()
                assert row[: len(want)] == want and set(row[len(want):]) <= {-1}


def test_attention_pooling_and_fixed_size_images(cpu_backend):
    model = _model(pool="map")
    batch = _batch()
    with torch.no_grad():
        pruneattn.patch(model, keep_rate=0.5)
        logits = model(batch)
        images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        fixed = model(images)
    assert logits.shape == (4, 5) and torch.isfinite(logits).all()
    assert fixed.shape == (2, 5) and (pruneattn.kept_indices(model)[1] >= 0).all()


def test_under_the_triton_interpreter(device):
    model = _model("axial", torch.float32)
    reference = _model("axial", torch.float64)
    with torch.no_grad():
        pruneattn.patch(model, keep_rate=0.7, layers=[1, 2])
        pruneattn.patch(reference, keep_rate=0.7, layers=[1, 2])
        with pruneattn.use_backend("triton"):
            got = model.to(device)({k: v.to(device) for k, v in _batch(dtype=torch.float32).items()})
        with pruneattn.use_backend("cpu"):
            want = reference(_batch())
    assert torch.equal(pruneattn.kept_indices(model)[2].cpu(), pruneattn.kept_indices(reference)[2])
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-4)


def test_compiles(cpu_backend):
    model = _model("axial", torch.float32, depth=2)
    batch = _batch(dtype=torch.float32)
    pruneattn.patch(model, keep_rate=0.7, layers=[1])
    with torch.no_grad():
        eager = model(batch)
        compiled = torch.compile(model)(batch)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-4)


def test_own_attention_mask_and_intermediates_are_refused(cpu_backend):
    model = _model()
    batch = _batch()
    pruneattn.patch(model, keep_rate=0.5)
    with pytest.raises(ValueError, match="not attn_mask"):
        model.forward_features(batch["patches"], batch["patch_coord"], batch["patch_valid"],
                               attn_mask=torch.zeros(4, 1, 64 + 2, 64 + 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="forward_intermediates of a patched NaFlexVit"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32, dtype=torch.float64))
