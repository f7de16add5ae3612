"""Models with attention dropout (transformers' ``attention_probs_dropout_prob`` / ``attention_dropout``,
timm's ``attn_drop``, ``nn.MultiheadAttention``'s ``dropout``).

Eval mode: dropout does nothing, so a patched model computes exactly what it computes without dropout.
Train mode: a pruning block applies the model's own dropout to its attention weights (PyTorch's SDPA with
``dropout_p``, as the unpatched SDPA models do), while its scores, and so the kept patches, come from the
attention without dropout. The truth is the UNPATCHED model under the same seed: at keep 1.0 the whole
model, and when pruning, the unpatched modules run by hand (its own attention module, dropout included,
then the spec's selection at the kept patches of the dropout-free attention).
"""
from __future__ import annotations

import copy

import pytest
import torch

import pruneattn
from model_reference import one_thread  # noqa: F401  (fixture)

T = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")


def _hf(impl="sdpa", p=0.3, cls=None, **extra):
    torch.manual_seed(0)
    config = T.ViTConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=3,
                         image_size=16, patch_size=4, attention_probs_dropout_prob=p, attn_implementation=impl, **extra)
    model = (cls or T.ViTModel)(config)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "ViTAttention":
                m.q_proj.weight.mul_(4.0)
    return model


def _timm(p=0.3, **extra):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3, attn_drop_rate=p,
                             num_classes=5, **extra)


def _open_clip(p=0.3):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    tower = open_clip.create_model("ViT-B-32", pretrained=None).visual
    tower.transformer.resblocks = tower.transformer.resblocks[:3]
    for block in tower.transformer.resblocks:
        block.attn.dropout = p
    return tower


def _images(size=16, n=2):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _seeded(model, x, seed=5):
    torch.manual_seed(seed)
    out = model(x)
    return getattr(out, "last_hidden_state", out)


BUILDERS = {
    "hf-sdpa": (lambda: _hf("sdpa"), 16),
    "hf-eager": (lambda: _hf("eager"), 16),
    "timm": (_timm, 32),
    "timm-ls": (lambda: _timm(init_values=0.5, proj_drop_rate=0.1), 32),
    "open_clip": (_open_clip, 224),  # (its position embedding: 7 x 7 patches)
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_keep_one_in_train_mode_equals_unpatched_under_the_same_seed(name, cpu_backend):
    """The unpatched model's dropout, draw for draw (eager attention: its float32 softmax, the same draws)."""
    build, size = BUILDERS[name]
    model = build().train()
    reference = copy.deepcopy(model)
    pruneattn.patch(model, keep_rate=1.0)
    x = _images(size)
    for seed in (5, 6):
        want, got = _seeded(reference, x, seed), _seeded(model, x, seed)
        tol = dict(rtol=1e-5, atol=1e-6) if name == "hf-eager" else dict(rtol=0, atol=0)
        torch.testing.assert_close(got, want, **tol)
    assert not torch.allclose(_seeded(model, x, 5), _seeded(model, x, 6))  # dropout does act


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_eval_mode_ignores_dropout(name, cpu_backend):
    """Eval mode: the same outputs and kept patches as the same model built without attention dropout."""
    build, size = BUILDERS[name]
    with_dropout = build().eval()
    without = copy.deepcopy(with_dropout)
    for m in without.modules():
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
        if isinstance(getattr(m, "attn_drop", None), torch.nn.Dropout):
            m.attn_drop.p = 0.0
    x = _images(size)
    outs = []
    for model in (with_dropout, without):
        pruneattn.patch(model, keep_rate=0.5, layers=(0, 2))
        with torch.no_grad():
            out = model(x)
        outs.append((getattr(out, "last_hidden_state", out), pruneattn.kept_indices(model)))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    assert all(torch.equal(outs[0][1][k], outs[1][1][k]) for k in (0, 2))


def _hf_by_hand(model, x, kept, seed):
    """The unpatched ViTModel in train mode under ``seed``, its layer 0 pruned by hand at ``kept``."""
    torch.manual_seed(seed)
    h = model.embeddings(x)
    layer = model.layers[0]
    h = h + layer.dropout(layer.attention(layer.layernorm_before(h))[0])
    h = torch.cat([h[:, :1], h[:, 1:].gather(1, kept[:, :, None].expand(-1, -1, h.shape[-1]))], dim=1)
    h = h + layer.dropout(layer.mlp(layer.layernorm_after(h)))
    for layer in model.layers[1:]:
        h = layer(h)
    return model.layernorm(h)


def _timm_by_hand(model, x, kept, seed):
    """The unpatched timm model in train mode under ``seed``, its block 0 pruned by hand at ``kept``."""
    torch.manual_seed(seed)
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    blk = model.blocks[0]
    h = h + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(h))))
    h = torch.cat([h[:, :1], h[:, 1:].gather(1, kept[:, :, None].expand(-1, -1, h.shape[-1]))], dim=1)
    h = h + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(h))))
    return model.forward_head(model.norm(model.blocks[1:](h)))


@pytest.mark.parametrize("kind", ["hf", "timm"])
def test_pruned_in_train_mode_keeps_the_dropout_free_selection(kind, cpu_backend):
    """Pruning in block 0 in train mode: the kept patches are those of eval mode (scores without dropout),
    and the output is the unpatched model's under the same seed with that block pruned by hand."""
    model = _hf() if kind == "hf" else _timm()
    reference = copy.deepcopy(model).train()
    x = _images(16 if kind == "hf" else 32, n=3)
    pruneattn.patch(model, keep_rate=0.5, layers=(0,))
    with torch.no_grad():
        model.eval()
        model(x)
        kept = pruneattn.kept_indices(model)[0]
        model.train()
        for seed in (1, 2, 3):
            got = _seeded(model, x, seed)
            assert torch.equal(pruneattn.kept_indices(model)[0], kept)
            by_hand = _hf_by_hand if kind == "hf" else _timm_by_hand
            torch.testing.assert_close(got, by_hand(reference, x, kept, seed), rtol=0, atol=0)


def test_train_mode_gradients_flow_through_the_dropped_out_attention(cpu_backend):
    model = _hf(cls=T.ViTForImageClassification, num_labels=3).train()
    reference = copy.deepcopy(model)
    pruneattn.patch(model, keep_rate=1.0)
    x = _images()
    grads = []
    for m in (reference, model):
        torch.manual_seed(3)
        m(x).logits.square().sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert sorted(grads[0]) == sorted(grads[1]) and len(grads[0]) > 20
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_train_mode_under_the_triton_interpreter(device):
    """The kernels' scores with SDPA's dropout: the same kept patches and outputs as the CPU path, seed for
    seed."""
    outs = []
    for backend in ("cpu", "triton"):
        model = _hf().train().to(device if backend == "triton" else "cpu")
        pruneattn.patch(model, keep_rate=0.5, layers=(0, 1))
        with torch.no_grad(), pruneattn.use_backend(backend):
            out = _seeded(model, _images(n=3).to(next(model.parameters()).device), 4)
        outs.append((out.cpu(), pruneattn.kept_indices(model)[1].cpu()))
    assert torch.equal(outs[0][1], outs[1][1])
    if device.type == "cpu":  # the same dropout draws on the CPU
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-4)


def test_parallel_attentions_with_different_dropout_are_refused():
    model = timm.create_model("vit_small_patch16_18x2_224", pretrained=False, img_size=32, depth=2)
    model.blocks[1].attns[1].attn.attn_drop.p = 0.2
    with pytest.raises(ValueError, match="different attention dropout rates"):
        pruneattn.patch(model, layers=(1,))
    assert not any(hasattr(m, "_pruneattn") for m in model.modules())
