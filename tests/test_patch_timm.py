"""pruneattn.patch on timm VisionTransformer models, against the independent reference in model_reference."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, DiffParallelScalingBlock, VisionTransformer

import pruneattn
from model_reference import kernel_device, one_thread, timm_forward, token_counts  # noqa: F401 (fixtures)
from pruneattn.patch.swap import derived_class
from pruneattn.patch.blocks import PrunedSequential
from pruneattn.validate import MODES, STATS

PrunedBlock = derived_class(PrunedSequential, Block)

# float64 models: scores and fuse weights are float32 by the spec, the fused token is accumulated
# in float32 by the core's select_tokens, so float64 paths agree to ~1e-7, not 1e-15.
FP64_TOL = 1e-6
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=10, num_heads=2, num_classes=10)  # 16 patches, d = 32


def tiny(cls=VisionTransformer, seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    return cls(**{**TINY, **kw}).eval()


def images(n: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def deit_s() -> VisionTransformer:
    torch.manual_seed(0)
    return timm.create_model("deit_small_patch16_224", pretrained=False).eval()


# ----------------------------------------------------------------------------- DeiT-S, full size


def test_deit_s_keep_rate_one_matches_unpatched(deit_s, kernel_device):
    """keep 1.0 runs the patched blocks through the Triton kernels (interpreter on CPU): same logits."""
    x = images(1, 224).to(kernel_device)
    model = deit_s.to(kernel_device)
    with torch.no_grad():
        ref = model(x)
        pruneattn.patch(model, keep_rate=1.0)
        try:
            assert pruneattn.backend_for(x.device) == "triton"
            counts, remove = token_counts(model, model.blocks)
            out = model(x)
            remove()
        finally:
            pruneattn.unpatch(model)
            model.cpu()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert counts == [197] * 12


@pytest.mark.parametrize("mode, counts", [("drop", [139, 98, 69]), ("fuse", [140, 99, 70])])
def test_deit_s_pruned_matches_reference(deit_s, cpu_backend, mode, counts):
    x = images(2, 224).double()
    model = deit_s.double()
    try:
        with torch.no_grad():
            expected, trace = timm_forward(model, x, {3: 0.7, 6: 0.7, 9: 0.7}, mode=mode)
            pruneattn.patch(model, keep_rate=0.7, mode=mode)
            seen, remove = token_counts(model, model.blocks)
            out = model(x)
            remove()
            kept = pruneattn.kept_indices(model)
    finally:
        pruneattn.unpatch(model)
        model.float()
    want = [197] * 3 + [counts[0]] * 3 + [counts[1]] * 3 + [counts[2]] * 3
    assert trace.tokens == want and seen == want
    torch.testing.assert_close(out, expected, rtol=FP64_TOL, atol=FP64_TOL)
    assert kept.keys() == trace.kept.keys() == {3, 6, 9}
    for i in kept:
        assert kept[i].dtype == torch.int64
        assert torch.equal(kept[i], trace.kept[i])
        assert kept[i].shape == (2, counts[[3, 6, 9].index(i)] - 1 - (mode == "fuse"))


def test_deit_s_fp32_logits_close_to_reference(deit_s, cpu_backend):
    x = images(1, 224)
    with torch.no_grad():
        expected, trace = timm_forward(deit_s.double(), x.double(), {3: 0.7, 6: 0.7, 9: 0.7}, stat="mad")
        deit_s.float()
        pruneattn.patch(deit_s, stat="mad")
        try:
            out = deit_s(x)
            kept = pruneattn.kept_indices(deit_s)
        finally:
            pruneattn.unpatch(deit_s)
    torch.testing.assert_close(out.double(), expected, rtol=1e-3, atol=1e-3)
    assert all(torch.equal(kept[i], trace.kept[i]) for i in kept)


# ----------------------------------------------------------------------------- model variants (tiny)


VARIANTS = {
    "vit": (VisionTransformer, {}, "cls"),
    "distilled": (VisionTransformerDistilled, {}, "cls"),
    "registers": (VisionTransformer, dict(reg_tokens=4), "cls"),
    "avgpool": (VisionTransformer, dict(global_pool="avg", class_token=False), "mean"),
    "avgpool_regs": (VisionTransformer, dict(global_pool="avg", class_token=False, reg_tokens=2), "mean"),
    "qknorm_layerscale": (VisionTransformer, dict(qk_norm=True, init_values=0.1), "cls"),
    "no_embed_class": (VisionTransformer, dict(no_embed_class=True, reg_tokens=1), "mean"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stat", STATS)
def test_variants_match_reference(cpu_backend, variant, mode, stat):
    cls, kw, query = VARIANTS[variant]
    model = tiny(cls, **kw).double()
    x = images().double()
    rates = {1: 0.7, 3: 0.5, 4: 0.8}
    with torch.no_grad():
        expected, trace = timm_forward(model, x, rates, stat=stat, query=query, mode=mode)
        pruneattn.patch(model, keep_rate=[0.8, 0.7, 0.5], layers=[4, 1, 3], stat=stat, query=query, mode=mode)
        seen, _ = token_counts(model, model.blocks)
        out = model(x)
        kept = pruneattn.kept_indices(model)
    prefix = model.num_prefix_tokens
    extra = int(mode == "fuse")
    # 16 patches: ceil(.7 * 16) = 12, ceil(.5 * 12) = 6, ceil(.8 * 6) = 5
    assert seen == [16 + prefix] + [n + prefix + extra for n in (12, 12, 6, 5, 5, 5, 5, 5, 5)]
    assert seen == trace.tokens
    torch.testing.assert_close(out, expected, rtol=FP64_TOL, atol=FP64_TOL)
    assert {i: v.tolist() for i, v in kept.items()} == {i: v.tolist() for i, v in trace.kept.items()}


def test_triton_kernels_in_patched_model(kernel_device):
    """The default backend (Triton; its interpreter on CPU) in the patched blocks, against fp64 truth."""
    model = tiny(depth=4)
    x = images()
    with torch.no_grad():
        expected, trace = timm_forward(model.double(), x.double(), {1: 0.6, 2: 0.5}, mode="fuse")
        model.float().to(kernel_device)
        pruneattn.patch(model, keep_rate=[0.6, 0.5], layers=(1, 2), mode="fuse")
        x = x.to(kernel_device)
        assert pruneattn.backend_for(x.device) == "triton"
        out = model(x)
        kept = pruneattn.kept_indices(model)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(kept[i].cpu(), trace.kept[i]) for i in (1, 2))


def test_keep_rate_one_tiny_matches_unpatched(cpu_backend):
    model = tiny(reg_tokens=2)
    x = images()
    with torch.no_grad():
        ref = model(x)
        pruneattn.patch(model, keep_rate=1.0, layers=range(10), mode="fuse")
        out = model(x)
        kept = pruneattn.kept_indices(model)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, torch.arange(16).expand(2, 16)) for v in kept.values())


def test_kept_indices_are_grid_positions(cpu_backend):
    """Zero out every patch but the kept ones and the model's tokens at those positions are the kept ones."""
    model = tiny()
    x = images(3)
    with torch.no_grad():
        pruneattn.patch(model, keep_rate=0.5, layers=(0, 2))
        model(x)
        kept = pruneattn.kept_indices(model)
    assert kept[0].shape == (3, 8) and kept[2].shape == (3, 4)
    for b in range(3):
        assert set(kept[2][b].tolist()) <= set(kept[0][b].tolist())
        assert kept[0][b].tolist() == sorted(kept[0][b].tolist())
        assert kept[2][b].tolist() == sorted(kept[2][b].tolist())


# ----------------------------------------------------------------------------- patch / unpatch mechanics


def test_unpatch_restores_outputs_and_state_dict(cpu_backend):
    model = tiny()
    x = images()
    sd = model.state_dict()
    names = [n for n, _ in model.named_parameters()]
    with torch.no_grad():
        ref = model(x)
        pruneattn.patch(model, keep_rate=0.5, mode="fuse")
        assert type(model.blocks[3]) is PrunedBlock and type(model.blocks[2]) is Block
        assert list(model.state_dict()) == list(sd)
        assert [n for n, _ in model.named_parameters()] == names
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), sd.values()))
        assert not torch.allclose(model(x), ref)
        assert pruneattn.unpatch(model) is model
        assert all(type(b) is Block for b in model.blocks)
        assert not any(hasattr(b, "_pruneattn") for b in model.blocks)
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_patch_twice_reconfigures(cpu_backend):
    x = images()
    fresh = tiny()
    twice = tiny()
    with torch.no_grad():
        pruneattn.patch(fresh, keep_rate=0.5, layers=(2,))
        pruneattn.patch(twice, keep_rate=0.9, layers=(1, 3), mode="fuse")
        assert pruneattn.patch(twice, keep_rate=0.5, layers=(2,)) is twice
        assert [type(b) for b in twice.blocks] == [type(b) for b in fresh.blocks]
        assert type(twice.blocks[2]).__bases__ == (PrunedSequential, Block)  # not double-wrapped
        torch.testing.assert_close(twice(x), fresh(x), rtol=0, atol=0)
        assert list(pruneattn.kept_indices(twice)) == [2]


def test_load_state_dict_across_patch(cpu_backend):
    a, b = tiny(seed=0), tiny(seed=1)
    pruneattn.patch(a)
    b.load_state_dict(a.state_dict())
    pruneattn.patch(b)
    with torch.no_grad():
        torch.testing.assert_close(a(images()), b(images()), rtol=0, atol=0)


def test_kept_indices_before_forward_or_unpatched():
    model = tiny()
    with pytest.raises(ValueError, match="not patched"):
        pruneattn.kept_indices(model)
    pruneattn.patch(model)
    with pytest.raises(RuntimeError, match="forward pass"):
        pruneattn.kept_indices(model)


# ----------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(layers=(3, 6, 10)), ValueError, r"\[0, 10\)"),
        (dict(layers=(-1,)), ValueError, "block indices"),
        (dict(layers=()), ValueError, "at least one"),
        (dict(layers=(1, 1)), ValueError, "repeat"),
        (dict(layers=(1.0,)), TypeError, "ints"),
        (dict(layers="12"), TypeError, "ints"),
        (dict(keep_rate=0.0), ValueError, r"\(0, 1\]"),
        (dict(keep_rate=1.5), ValueError, r"\(0, 1\]"),
        (dict(keep_rate=-0.1), ValueError, r"\(0, 1\]"),
        (dict(keep_rate=float("nan")), ValueError, r"\(0, 1\]"),
        (dict(keep_rate=True), TypeError, "number"),
        (dict(keep_rate="0.7"), TypeError, "number"),
        (dict(keep_rate=[0.7, 0.7], layers=(1, 2, 3)), ValueError, "one per layer"),
        (dict(stat="std"), ValueError, "stat"),
        (dict(query="all"), ValueError, "query"),
        (dict(mode="merge"), ValueError, "mode"),
    ],
)
def test_bad_arguments(kwargs, err, match):
    model = tiny()
    kwargs = {"layers": (1, 2, 3), **kwargs}
    with pytest.raises(err, match=match):
        pruneattn.patch(model, **kwargs)
    assert all(type(b) is Block for b in model.blocks)  # nothing done


def test_cls_query_without_class_token_is_an_error():
    model = tiny(global_pool="avg", class_token=False, reg_tokens=4)
    with pytest.raises(ValueError, match="class token.*query='mean'"):
        pruneattn.patch(model, layers=(1,), query="cls")
    assert all(type(b) is Block for b in model.blocks)


def test_unsupported_models_name_their_class():
    with pytest.raises(TypeError, match="Linear"):
        pruneattn.patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="nn.Module.*int"):
        pruneattn.patch(3)
    resnet = timm.models.resnet.ResNet(block=timm.models.resnet.BasicBlock, layers=[1, 1, 1, 1])
    with pytest.raises(TypeError, match="ResNet"):
        pruneattn.patch(resnet)
    diff = tiny(block_fn=DiffParallelScalingBlock)
    with pytest.raises(TypeError, match="DiffParallelScalingBlock"):
        pruneattn.patch(diff, layers=(1,))
    assert all(type(b) is DiffParallelScalingBlock for b in diff.blocks) and type(diff) is VisionTransformer


def test_attn_mask_is_an_error(cpu_backend):
    model = tiny()
    pruneattn.patch(model, layers=(1,))
    with pytest.raises(ValueError, match="attn_mask"):
        model(images(), attn_mask=torch.zeros(17, 17, dtype=torch.bool))


# ----------------------------------------------------------------------------- practical matters


def test_no_value_read_back_to_the_host(cpu_backend, monkeypatch):
    """A patched forward never turns a tensor into a Python value (that would be a sync on CUDA)."""
    model = pruneattn.patch(tiny(), keep_rate=0.5, layers=(1, 2), mode="fuse")
    x = images()
    model(x)  # warm-up outside the trap
    # Value checks (finite scores) run on CPU tensors only; switch them off as they are on CUDA ones.
    monkeypatch.setattr(pruneattn.validate, "value_checks", lambda t: False)

    def trap(self, *args):
        raise AssertionError("host read of a tensor value during the forward")

    for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, trap)
    with torch.no_grad():
        model(x)
    monkeypatch.undo()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_cuda_sync_in_patched_forward():
    model = pruneattn.patch(tiny().cuda(), keep_rate=0.5, layers=(1, 2), mode="fuse")
    x = images().cuda()
    model(x)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            model(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_autocast_bfloat16_with_qk_norm(cpu_backend):
    model = pruneattn.patch(tiny(qk_norm=True), keep_rate=0.5, layers=(1, 2))
    x = images()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert pruneattn.kept_indices(model)[2].shape == (2, 4)


def test_deepcopy_and_pickle(cpu_backend):
    import copy
    import io

    model = pruneattn.patch(tiny(), keep_rate=0.5, layers=(1, 2), mode="fuse")
    x = images()
    with torch.no_grad():
        ref = model(x)
        clone = copy.deepcopy(model)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        for m in (clone, loaded):
            torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
            assert type(m.blocks[1]) is PrunedBlock and m.blocks[1]._pruneattn is not model.blocks[1]._pruneattn
        pruneattn.unpatch(clone)
        assert type(clone.blocks[1]) is Block and type(model.blocks[1]) is PrunedBlock


def test_wrapped_model_error_hints_at_order():
    compiled = torch.compile(tiny())
    with pytest.raises(TypeError, match="OptimizedModule.*before wrapping"):
        pruneattn.patch(compiled)


@pytest.mark.parametrize(("depth", "expected"), [(1, (0,)), (4, (1, 2, 3)), (12, (3, 6, 9)), (24, (6, 12, 18)), (27, (7, 14, 20))])
def test_default_layers_follow_depth(depth, expected):
    assert pruneattn.default_layers(depth) == expected


# ----------------------------------------------------------------------------- tokens=


def test_tokens_keep_exactly_that_many_and_match_the_keep_rate_with_that_count(cpu_backend):
    x = images(3)
    with torch.no_grad():
        by_rate = pruneattn.patch(tiny(), keep_rate=[0.5, 0.5], layers=(1, 4), mode="fuse")
        by_tokens = pruneattn.patch(tiny(), tokens=[8, 4], layers=(1, 4), mode="fuse")
        torch.testing.assert_close(by_tokens(x), by_rate(x), rtol=0, atol=0)
        kept = pruneattn.kept_indices(by_tokens)
    assert kept[1].shape == (3, 8) and kept[4].shape == (3, 4)
    with torch.no_grad():
        same = pruneattn.patch(tiny(), tokens=5, layers=(2, 5, 8))  # 5 of 16, then 5 of 5 twice
        same(x)
    assert [v.shape for v in pruneattn.kept_indices(same).values()] == [(3, 5)] * 3


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(tokens=4, keep_rate=0.5), ValueError, "either keep_rate or tokens"),
        (dict(tokens=0), ValueError, ">= 1"),
        (dict(tokens=4.0), TypeError, "int"),
        (dict(tokens=True), TypeError, "int"),
        (dict(tokens=[4, 4]), ValueError, "one per layer"),
    ],
)
def test_bad_tokens(kwargs, err, match):
    model = tiny()
    with pytest.raises(err, match=match):
        pruneattn.patch(model, layers=(1, 2, 3), **kwargs)
    assert all(type(b) is Block for b in model.blocks)


def test_tokens_more_than_the_input_has_raise_at_the_forward(cpu_backend):
    model = pruneattn.patch(tiny(), tokens=17, layers=(1,))
    with pytest.raises(ValueError, match="tokens=17.*only 16"):
        model(images())
