"""A patched model fine-tunes: gradients reach every parameter, match an eager float64 reference, and
a short run on a synthetic task lowers the loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from transformers import DeiTConfig, DeiTForImageClassification

import pruneattn
from pruneattn.validate import MODES
from model_reference import hf_forward, kernel_device, one_thread, timm_forward  # noqa: F401 (fixtures)

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=4)


def tiny(seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(**{**TINY, **kw})


def batch(n: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, expected: dict, rtol: float) -> None:
    """Per parameter: |got - expected| <= rtol * (|expected| + 1e-3 |all gradients|), in norms.

    The floor relative to the whole gradient lets through the noise of gradients that are zero in
    exact arithmetic (the key bias: softmax ignores a shift of all logits).
    """
    assert got.keys() == expected.keys()
    total = torch.cat([g.flatten() for g in expected.values()]).double().norm()
    for name, ref in expected.items():
        err = (got[name].double() - ref.double()).norm()
        assert err <= rtol * (ref.double().norm() + 1e-3 * total), (name, float(err), float(ref.norm()))


@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_every_trained_parameter(mode):
    model = tiny(reg_tokens=1).train()
    x, y = batch()
    with pruneattn.use_backend("cpu"):
        F.cross_entropy(model(x), y).backward()
        plain = {n for n, g in grads(model).items() if g.abs().sum() > 0}
        model.zero_grad(set_to_none=True)
        pruneattn.patch(model, keep_rate=0.5, layers=(1, 2), mode=mode)
        F.cross_entropy(model(x), y).backward()
        patched = {n for n, g in grads(model).items() if g.abs().sum() > 0}
    assert plain == {n for n, p in model.named_parameters() if p.requires_grad}
    assert patched == plain


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_float64_reference(backend, mode):
    """Gradients of every parameter and of the input, patched model vs eager reference, float64.

    The fuse weights are constants in the backward (the core's ``select_tokens`` contract), so the
    reference detaches them too; the selection itself is discrete.
    """
    model = tiny(init_values=0.5, qk_norm=True).double().train()
    x, _ = batch(3)
    x = x.double()
    target = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rates = {1: 0.6, 3: 0.5}

    x_ref = x.clone().requires_grad_(True)
    logits, _ = timm_forward(model, x_ref, rates, mode=mode, stat="mad", detach_fuse_weights=True)
    (logits * target).sum().backward()
    expected, expected_x = grads(model), x_ref.grad
    model.zero_grad(set_to_none=True)

    pruneattn.patch(model, keep_rate=[0.6, 0.5], layers=(1, 3), mode=mode, stat="mad")
    x_pat = x.clone().requires_grad_(True)
    with pruneattn.use_backend(backend):
        (model(x_pat) * target).sum().backward()
    assert_grads_close(grads(model), expected, rtol=1e-6)
    assert_grads_close({"x": x_pat.grad}, {"x": expected_x}, rtol=1e-6)


def test_hf_gradients_match_float64_reference():
    torch.manual_seed(0)
    config = DeiTConfig(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128,
        image_size=32, patch_size=8, num_labels=4,
    )
    model = DeiTForImageClassification(config).double().train()
    x, _ = batch(2)
    x = x.double()
    hidden, _ = hf_forward(model.deit, x, {1: 0.5}, mode="fuse", detach_fuse_weights=True)
    model.classifier(hidden[:, 0]).square().sum().backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    pruneattn.patch(model, keep_rate=0.5, layers=(1,), mode="fuse")
    with pruneattn.use_backend("cpu"):
        model(x).logits.square().sum().backward()
    assert_grads_close(grads(model), expected, rtol=1e-6)


def test_triton_backward_float32(kernel_device):
    """Gradients through the default backend (Triton forward; interpreter on CPU) against float64."""
    model = tiny(depth=2)
    x, y = batch(2)
    model.double()
    logits, _ = timm_forward(model, x.double(), {1: 0.5}, mode="fuse", detach_fuse_weights=True)
    F.cross_entropy(logits, y).backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    model.float().to(kernel_device)
    pruneattn.patch(model, keep_rate=0.5, layers=(1,), mode="fuse")
    F.cross_entropy(model(x.to(kernel_device)), y.to(kernel_device)).backward()
    assert_grads_close({n: g.cpu() for n, g in grads(model).items()}, expected, rtol=1e-3)


def test_short_training_run_lowers_the_loss():
    """Synthetic task: the label is the image's colour cast. 20 AdamW steps on a patched model."""
    model = tiny(drop_path_rate=0.1)
    pruneattn.patch(model, keep_rate=0.5, layers=(1, 2), mode="fuse")
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    colours = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [-1, -1, -1]])

    def make(n):
        y = torch.randint(0, 4, (n,), generator=g)
        return torch.randn(n, 3, 32, 32, generator=g) + colours[y][:, :, None, None], y

    val_x, val_y = make(64)
    with pruneattn.use_backend("cpu"):
        model.eval()
        with torch.no_grad():
            before = F.cross_entropy(model(val_x), val_y).item()
        model.train()
        for _ in range(20):
            x, y = make(16)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            logits = model(val_x)
    after = F.cross_entropy(logits, val_y).item()
    assert after < 0.5 * before, (before, after)
    assert (logits.argmax(1) == val_y).float().mean() > 0.8


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant, monkeypatch):
    """The recompute runs the blocks again last to first: same gradients, and the kept indices of
    the whole forward stay readable afterwards (the recompute must not mark them stale)."""
    import timm.layers.config

    monkeypatch.setattr(timm.layers.config, "_USE_REENTRANT_CKPT", reentrant)
    model = tiny(depth=4).train()
    pruneattn.patch(model, keep_rate=0.5, layers=(1, 2), mode="fuse")
    x, y = batch()
    with pruneattn.use_backend("cpu"):
        F.cross_entropy(model(x), y).backward()
        plain = grads(model)
        kept = pruneattn.kept_indices(model)
        model.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(True)
        F.cross_entropy(model(x), y).backward()
    assert_grads_close(grads(model), plain, rtol=1e-6)
    assert all(torch.equal(pruneattn.kept_indices(model)[i], kept[i]) for i in kept)


@pytest.mark.parametrize("reentrant", [False, True])
def test_hf_gradient_checkpointing_gives_the_same_gradients(reentrant):
    torch.manual_seed(0)
    config = DeiTConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=128, num_labels=4,
    )
    model = DeiTForImageClassification(config).train()
    pruneattn.patch(model, keep_rate=0.5, layers=(1, 2), mode="fuse")
    x, y = batch()
    with pruneattn.use_backend("cpu"):
        F.cross_entropy(model(x).logits, y).backward()
        plain = grads(model)
        kept = pruneattn.kept_indices(model)
        model.zero_grad(set_to_none=True)
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x; the old name warns there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        F.cross_entropy(model(x).logits, y).backward()
    assert_grads_close(grads(model), plain, rtol=1e-6)
    assert all(torch.equal(pruneattn.kept_indices(model)[i], kept[i]) for i in kept)
