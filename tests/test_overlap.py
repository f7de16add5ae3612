"""pruneattn.overlap_patches: overlapping conv patch embedding for timm ViTs, alone and with patch()."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from transformers import ViTConfig, ViTModel

import pruneattn
from model_reference import one_thread, timm_forward, token_counts  # noqa: F401 (one_thread: autouse fixture)

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=4)


def tiny(cls=VisionTransformer, **kw) -> VisionTransformer:
    torch.manual_seed(0)
    return cls(**{**TINY, **kw}).eval()


def images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def cpu_backend():
    with pruneattn.use_backend("cpu"):
        yield


def test_deit_s_324_patches_and_pruning_on_top():
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval().double()
    keys = list(model.state_dict())
    assert pruneattn.overlap_patches(model, stride=12, padding=2) is model
    assert list(model.state_dict()) == keys
    assert model.patch_embed.grid_size == (18, 18) and model.patch_embed.num_patches == 324
    assert model.pos_embed.shape == (1, 325, 384)
    x = images(1, 224).double()
    with torch.no_grad():
        assert model.forward_features(x).shape == (1, 1 + 324, 384)
        expected, trace = timm_forward(model, x, {3: 0.7, 6: 0.7, 9: 0.7})
        pruneattn.patch(model, keep_rate=0.7)
        seen, _ = token_counts(model, model.blocks)
        out = model(x)
        kept = pruneattn.kept_indices(model)
    # 324 -> ceil(.7 * 324) = 227 -> 159 -> 112 patches, plus the class token
    assert seen == trace.tokens == [325] * 3 + [228] * 3 + [160] * 3 + [113] * 3
    assert out.shape == (1, 1000)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(kept[9], trace.kept[9]) and int(kept[3].max()) < 324


@pytest.mark.parametrize(
    "kw",
    [dict(stride=8, padding=0), dict(stride=8, padding=2, kernel_size=12), dict(stride=8, padding=4, kernel_size=16)],
)
@pytest.mark.parametrize("variant", [{}, dict(reg_tokens=2, no_embed_class=True), dict(dynamic_img_size=True)])
def test_identity_conversions_keep_logits(kw, variant):
    """stride == kernel, no padding: the same model. A kernel zero-padded by 2p around the old one, with
    padding p, the old stride: the same model too (the weight rule: old kernel centred, zeros around)."""
    model = tiny(**variant)
    x = images()
    with torch.no_grad():
        ref = model(x)
        pruneattn.overlap_patches(model, **kw)
        out = model(x)
    assert model.patch_embed.grid_size == (4, 4)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_zero_padded_kernel_and_copied_weights():
    model = tiny()
    old_w, old_b = model.patch_embed.proj.weight.detach().clone(), model.patch_embed.proj.bias.detach().clone()
    pruneattn.overlap_patches(model, stride=6, padding=3, kernel_size=12)
    w = model.patch_embed.proj.weight
    assert w.shape[-2:] == (12, 12) and w.requires_grad
    assert torch.equal(w[:, :, 2:10, 2:10], old_w)
    border = w.detach().clone()
    border[:, :, 2:10, 2:10] = 0
    assert not border.any()  # zeros around the old kernel
    assert torch.equal(model.patch_embed.proj.bias, old_b)
    assert model.patch_embed.proj.stride == (6, 6) and model.patch_embed.proj.padding == (3, 3)


@pytest.mark.parametrize("cls, kw, prefix", [
    (VisionTransformer, {}, 1),
    (VisionTransformerDistilled, {}, 2),
    (VisionTransformer, dict(reg_tokens=4), 5),
    (VisionTransformer, dict(global_pool="avg", class_token=False), 0),
])
def test_token_counts_and_position_embeddings(cls, kw, prefix):
    model = tiny(cls, **kw)
    with torch.no_grad():
        model.pos_embed[:, :prefix] = torch.randn(1, prefix, 64)
        model.pos_embed[:, prefix:] = 0.25  # a constant grid stays constant under interpolation
    before = model.pos_embed[:, :prefix].clone()
    pruneattn.overlap_patches(model, stride=6, padding=2)  # (32 + 4 - 8) // 6 + 1 = 5
    assert model.patch_embed.grid_size == (5, 5)
    assert model.pos_embed.shape == (1, prefix + 25, 64) and model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed[:, :prefix], before)
    torch.testing.assert_close(model.pos_embed[:, prefix:], torch.full((1, 25, 64), 0.25))
    with torch.no_grad():
        assert model.forward_features(images()).shape == (2, prefix + 25, 64)
        query = "cls" if kw.get("class_token", True) else "mean"
        pruneattn.patch(model, keep_rate=0.5, layers=(1,), query=query)
        seen, _ = token_counts(model, model.blocks)
        model(images())
    assert seen == [prefix + 25, prefix + 13, prefix + 13, prefix + 13]


def test_dynamic_img_size_other_resolution():
    model = pruneattn.overlap_patches(tiny(dynamic_img_size=True), stride=6, padding=1)  # 32 -> 5 x 5
    pruneattn.patch(model, keep_rate=0.5, layers=(2,))
    with torch.no_grad():
        assert model.forward_features(images(2, 40)).shape == (2, 1 + 18, 64)  # 40 -> 6 x 6 = 36 -> 18


def test_errors():
    torch.manual_seed(0)
    hf = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=32))
    with pytest.raises(TypeError, match="ViTModel"):
        pruneattn.overlap_patches(hf)
    with pytest.raises(ValueError, match="skipped"):
        pruneattn.overlap_patches(tiny(), stride=9)
    with pytest.raises(ValueError, match="even"):
        pruneattn.overlap_patches(tiny(), kernel_size=11)
    with pytest.raises(ValueError, match="even"):
        pruneattn.overlap_patches(tiny(), kernel_size=6)
    with pytest.raises(TypeError, match="stride"):
        pruneattn.overlap_patches(tiny(), stride=True)
    with pytest.raises(ValueError, match="padding"):
        pruneattn.overlap_patches(tiny(), padding=-1)
    model = tiny()
    with pytest.raises(ValueError):
        pruneattn.overlap_patches(model, stride=0)
    assert type(model.patch_embed).__name__ == "PatchEmbed"  # untouched
