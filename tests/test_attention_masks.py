"""Hugging Face encoders that take an ``attention_mask`` (a key padding mask over their tokens: ViT, DeiT,
DINOv2 with and without registers, ViT-MSN, I-JEPA, ViT-MAE) pruned under that mask.

The truth is each image's real tokens run ALONE, unpadded and unmasked, through an eager pruned forward
written here in float64 (plain softmax attention, the spec's score: population variance over heads of
the class row, or of the mean over query rows without a class token; top-k with ties to the lower
index; the fused token a weighted average by head-mean received attention). A key padding mask hides
the masked tokens from every query, so the real tokens of the padded, masked batch must come out the
same, with the kept indices of the grid (-1 after each image's own count). Keep rate 1.0 equals the
unpatched model called with the same mask. Masks that are not key padding masks are refused before
any layer runs. Random weights from configs, q scaled so that the scores differ.
"""
from __future__ import annotations

import math

import pytest
import torch

import pruneattn
from model_reference import one_thread  # noqa: F401  (fixture)

T = pytest.importorskip("transformers")

SMALL = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=4, image_size=20, patch_size=4)  # 25 patches

FAMILIES = {  # builder of the config, model class, prefix tokens
    "vit": (T.ViTConfig, T.ViTModel, 1),
    "deit": (T.DeiTConfig, T.DeiTModel, 2),
    "dinov2": (T.Dinov2Config, T.Dinov2Model, 1),
    "dinov2_registers": (lambda **kw: T.Dinov2WithRegistersConfig(num_register_tokens=2, **kw),
                         T.Dinov2WithRegistersModel, 3),
    "vit_msn": (T.ViTMSNConfig, T.ViTMSNModel, 1),
    "ijepa": (T.IJepaConfig, T.IJepaModel, 0),
    "vit_mae": (lambda **kw: T.ViTMAEConfig(mask_ratio=0.0, **kw), T.ViTMAEModel, 1),
}


def _model(name, heads=3, dtype=torch.float64, impl="sdpa", **extra):
    config, cls, _ = FAMILIES[name]
    torch.manual_seed(0)
    model = cls(config(**SMALL, num_attention_heads=heads, attn_implementation=impl, **extra))
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "q_proj") and hasattr(m, "scaling"):
                m.q_proj.weight.mul_(4.0)
            if type(m).__name__.endswith("LayerScale"):
                m.lambda1.uniform_(0.5, 1.5)
    return model.eval().to(dtype)


def _layers(model):
    return model.layers if hasattr(model, "layers") else model.encoder.layer


def _masks(batch, prefix, seed, holes=True):
    """(B, prefix + 25) 0 / 1 masks: the prefix real; per image, patches masked at the end (padding) and,
    with ``holes``, in between; the first image unmasked, the last with one real patch."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, prefix + 25, dtype=torch.long)
    for b in range(1, batch):
        n_real = 1 if b == batch - 1 else int(torch.randint(2, 25, (1,), generator=g))
        mask[b, prefix + n_real:] = 0
        if holes and n_real > 3:
            mask[b, prefix + torch.randperm(n_real, generator=g)[: n_real // 3]] = 0
    return mask


def _parts(layer):
    """(norm before attention, attention module, after attention, norm before MLP, after MLP) of a layer."""
    if hasattr(layer, "layernorm_before"):  # ViT-style
        return layer.layernorm_before, layer.attention, lambda y: y, layer.layernorm_after, lambda y: y
    return layer.norm1, layer.attention, layer.layer_scale1, layer.norm2, layer.layer_scale2  # DINOv2


def _eager_alone(layers, x, rates, prefix, query, mode="drop", tokens=None):
    """One image's real tokens ``x`` (1, n, C) through the layers; the layers in ``rates`` keep
    ceil(rate * P) (``tokens``: min(tokens, P)) of their P patches after the attention. Returns the tokens
    and {layer: kept positions among the input patches}."""
    kept, grid, fused = {}, None, False
    for i, layer in enumerate(layers):
        norm1, a, after1, norm2, after2 = _parts(layer)
        h = norm1(x)
        n = h.shape[1]
        q, k, v = (proj(h).view(1, n, -1, a.head_dim).transpose(1, 2) for proj in (a.q_proj, a.k_proj, a.v_proj))
        attn = torch.softmax(q @ k.transpose(-1, -2) * a.scaling, dim=-1)
        x = x + after1(a.o_proj((attn @ v).transpose(1, 2).reshape(1, n, -1)))
        if i in rates:
            received = (attn[0, :, 0] if query == "cls" else attn[0].mean(dim=1))[:, prefix:]  # (H, P [+ 1])
            P = n - prefix - int(fused)
            centred = received[:, :P] - received[:, :P].mean(dim=0)
            score = (centred * centred).mean(dim=0)
            n_keep = min(tokens, P) if tokens is not None else (max(1, math.ceil(round(rates[i] * P, 9))) if P else 0)
            idx = sorted(sorted(range(P), key=lambda j: (-float(score[j]), j))[:n_keep])
            parts = [x[:, :prefix], x[:, [prefix + j for j in idx]]]
            if mode == "fuse":  # the dropped patches and the old fused token, by head-mean received attention
                w = received.mean(dim=0).float()  # float32, like the scores (spec)
                w[idx] = 0.0
                w = (w / w.sum() if w.sum() > 0 else w).to(x.dtype)  # nothing dropped: a zero token
                parts.append((w[None, :, None] * x[:, prefix:]).sum(dim=1, keepdim=True))
            x, fused = torch.cat(parts, dim=1), fused or mode == "fuse"
            grid = idx if grid is None else [grid[j] for j in idx]
            kept[i] = list(grid)
        x = x + after2(layer.mlp(norm2(x)))
    return x, kept


def _embeddings(model, pixels):
    """The tokens the layers receive and the grid position of each patch token (ViT-MAE shuffles them),
    recorded from the model's own embeddings in the call."""
    seen = {}

    def record(module, args, out):
        tokens = out[0] if isinstance(out, tuple) else out
        seen["tokens"] = tokens
        seen["grid"] = out[2].argsort(dim=1) if isinstance(out, tuple) else None

    hook = model.embeddings.register_forward_hook(record)
    return seen, hook


CASES = [  # family, heads, batch, rates by layer
    ("vit", 3, 4, {1: 0.7, 2: 0.5}),
    ("vit", 4, 1, {0: 0.5}),
    ("deit", 2, 3, {1: 0.6, 3: 0.5}),
    ("dinov2", 3, 3, {0: 0.7, 2: 0.7}),
    ("dinov2_registers", 4, 3, {1: 0.5}),
    ("vit_msn", 3, 2, {2: 0.3}),
    ("ijepa", 3, 4, {1: 0.7, 2: 0.5}),
    ("vit_mae", 2, 3, {1: 0.5}),
]


@pytest.mark.parametrize("name, heads, batch, rates", CASES, ids=[f"{c[0]}-h{c[1]}-b{c[2]}" for c in CASES])
@pytest.mark.parametrize("mode", ["drop", "fuse"])
def test_pruned_under_a_mask_equals_each_image_alone(name, heads, batch, rates, mode, cpu_backend):
    model = _model(name, heads)
    prefix = FAMILIES[name][2]
    query = "cls" if prefix else "mean"
    mask = _masks(batch, prefix, seed=batch + heads)
    pixels = torch.randn(batch, 3, 20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(heads))
    pruneattn.patch(model, keep_rate=list(rates.values()), layers=list(rates), mode=mode)
    seen, hook = _embeddings(model, pixels)
    with torch.no_grad():
        out = model(pixels, attention_mask=mask).last_hidden_state
        hook.remove()
        kept = pruneattn.kept_indices(model)
        last = max(rates)
        for b in range(batch):
            real = mask[b].bool()
            x, want = _eager_alone(_layers(model), seen["tokens"][b : b + 1, real], rates, prefix, query, mode)
            x = model.layernorm(x)
            rows = torch.cat([torch.ones(prefix, dtype=torch.bool), kept[last][b] >= 0,
                              torch.ones(int(mode == "fuse"), dtype=torch.bool)])
            tol = 1e-9 if mode == "drop" else 1e-6  # the fuse weights are float32 (spec)
            torch.testing.assert_close(out[b, rows], x[0], rtol=tol, atol=tol)
            patches = real[prefix:].nonzero()[:, 0]  # the image's real patches, in token order
            grid = seen["grid"][b] if seen["grid"] is not None else torch.arange(25)  # ViT-MAE: shuffled
            for layer, positions in want.items():
                row = kept[layer][b].tolist()
                expect = [int(grid[patches[j]]) for j in positions]
                assert row[: len(expect)] == expect and set(row[len(expect):]) <= {-1}


@pytest.mark.parametrize("name", ["vit", "dinov2_registers", "ijepa"])
def test_tokens_per_image_under_a_mask(name, cpu_backend):
    model = _model(name)
    prefix = FAMILIES[name][2]
    mask = _masks(4, prefix, seed=3)
    pixels = torch.randn(4, 3, 20, 20, dtype=torch.float64)
    embeddings = model.embeddings(pixels)
    pruneattn.patch(model, tokens=5, layers=[1])
    with torch.no_grad():
        out = model(pixels, attention_mask=mask).last_hidden_state
        kept = pruneattn.kept_indices(model)[1]
        real_patches = mask[:, prefix:].sum(dim=1)
        assert ((kept >= 0).sum(dim=1) == real_patches.clamp(max=5)).all() and out.shape[1] == prefix + 5
        for b in range(4):
            x, _ = _eager_alone(_layers(model), embeddings[b : b + 1, mask[b].bool()], {1: 1.0}, prefix,
                                "cls" if prefix else "mean", tokens=5)
            n = x.shape[1]
            torch.testing.assert_close(out[b, :n], model.layernorm(x)[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_keep_one_equals_unpatched_with_the_mask(name, impl, cpu_backend):
    """Keep rate 1.0 with the caller's mask: the unpatched model's outputs (SDPA: bit for bit; eager:
    transformers' eager attention takes its softmax in float32)."""
    model = _model(name, impl=impl)
    prefix = FAMILIES[name][2]
    mask = _masks(3, prefix, seed=5)
    pixels = torch.randn(3, 3, 20, 20, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(1)  # ViT-MAE's random shuffle
        want = model(pixels, attention_mask=mask, output_hidden_states=True)
        pruneattn.patch(model, keep_rate=1.0, layers=[0, 2])
        torch.manual_seed(1)
        got = model(pixels, attention_mask=mask, output_hidden_states=True)
    tol = dict(rtol=0, atol=0) if impl == "sdpa" else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, **tol)
    for g, w in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(g, w, **tol)
    kept = pruneattn.kept_indices(model)[2]
    assert ((kept >= 0) == mask[:, prefix:].bool()).all() if name != "vit_mae" else kept.shape == (3, 25)


@pytest.mark.parametrize("cls_name", ["ViTForImageClassification", "DeiTForImageClassificationWithTeacher",
                                      "Dinov2ForImageClassification"])
def test_keep_one_classifiers_equal_unpatched_with_a_4d_mask(cls_name, cpu_backend):
    """A (B, 1, 1, N) boolean or additive key mask, as transformers passes it through: the same logits."""
    config = {"ViT": T.ViTConfig, "DeiT": T.DeiTConfig, "Dinov2": T.Dinov2Config}[cls_name.split("For")[0]]
    torch.manual_seed(0)
    model = getattr(T, cls_name)(config(**SMALL, num_attention_heads=3, num_labels=4)).eval().double()
    prefix = 2 if "DeiT" in cls_name else 1
    seen = _masks(3, prefix, seed=2).bool()[:, None, None, :]
    additive = torch.zeros(seen.shape, dtype=torch.float64).masked_fill(~seen, float("-inf"))
    pixels = torch.randn(3, 3, 20, 20, dtype=torch.float64)
    with torch.no_grad():
        want = [model(pixels, attention_mask=m).logits for m in (seen, additive)]
        pruneattn.patch(model, keep_rate=1.0)
        got = [model(pixels, attention_mask=m).logits for m in (seen, additive)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def _bad_masks(n: int, prefix: int) -> dict:
    ok = torch.ones(2, n, dtype=torch.long)
    per_query = torch.ones(2, 1, n, n, dtype=torch.bool).tril()
    per_head = torch.ones(2, 3, 1, n, dtype=torch.bool)
    per_head[:, 1, :, -1] = False
    bad = {
        "per query": (per_query, "differs between queries or heads"),
        "per head": (per_head, "differs between queries or heads"),
        "a bias": (torch.full((2, 1, 1, n), -1.0, dtype=torch.float64), "a bias"),
        "integers 4-D": (torch.ones(2, 1, 1, n, dtype=torch.long), "must be boolean"),
        "3-D": (torch.ones(2, n, n), "of shape"),
        "all masked": (ok.clone().index_fill_(0, torch.tensor([1]), 0), "every token"),
        "a list": ([[1] * n] * 2, "must be a tensor"),
    }
    if prefix:
        bad["prefix masked"] = (ok.clone().index_fill_(1, torch.tensor([prefix - 1]), 0), "class, distillation")
    return bad


@pytest.mark.parametrize("name", ["vit", "deit", "dinov2_registers", "ijepa"])
def test_masks_that_are_not_key_padding_are_refused_before_any_work(name, cpu_backend):
    model = _model(name)
    prefix = FAMILIES[name][2]
    pruneattn.patch(model, keep_rate=0.5, layers=[1])
    calls = []
    hook = model.embeddings.register_forward_pre_hook(lambda *a: calls.append(1))
    pixels = torch.randn(2, 3, 20, 20, dtype=torch.float64)
    for what, (mask, match) in _bad_masks(prefix + 25, prefix).items():
        error = TypeError if what == "a list" else ValueError
        with pytest.raises(error, match=match):
            model(pixels, attention_mask=mask)
        assert calls == [], what
    hook.remove()


def test_a_mask_of_the_wrong_width_is_refused(cpu_backend):
    model = _model("vit")
    pruneattn.patch(model, keep_rate=0.5, layers=[0])
    with pytest.raises(ValueError, match="padding mask over 20 tokens for its 26"):
        model(torch.randn(1, 3, 20, 20, dtype=torch.float64), attention_mask=torch.ones(1, 1, 1, 20, dtype=torch.bool))


def test_gradients_under_a_mask_equal_the_reference(cpu_backend):
    """Training under a mask: the gradients of the real tokens' loss with respect to the input tokens and
    the weights are those of the eager pruned forward of each image alone."""
    model = _model("dinov2", heads=4)
    mask = _masks(3, 1, seed=7)
    pixels = torch.randn(3, 3, 20, 20, dtype=torch.float64)
    weights = torch.randn(48, dtype=torch.float64)
    pruneattn.patch(model, keep_rate=[0.7, 0.5], layers=[1, 2])
    model.train()  # no dropout in this config: train mode only turns on autograd paths
    out = model(pixels, attention_mask=mask).last_hidden_state
    kept = pruneattn.kept_indices(model)[2]
    rows = torch.cat([torch.ones(3, 1, dtype=torch.bool), kept >= 0], dim=1)
    (out[rows] @ weights).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    embeddings = model.embeddings(pixels)
    total = 0
    for b in range(3):
        x, _ = _eager_alone(_layers(model), embeddings[b : b + 1, mask[b].bool()], {1: 0.7, 2: 0.5}, 1, "cls")
        total = total + (model.layernorm(x)[0] @ weights).sum()
    total.backward()
    assert len(got) > 20
    for n, p in model.named_parameters():
        if n in got:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-8, atol=1e-10, msg=n)


def test_activation_checkpointing_under_a_mask(cpu_backend):
    """With gradient checkpointing the layers after a pruning layer are recomputed outside the call: they
    get the same masks, and the gradients are those without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        model = _model("vit")
        pruneattn.patch(model, keep_rate=0.5, layers=[1])
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        out = model(torch.randn(3, 3, 20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
                    attention_mask=_masks(3, 1, seed=1)).last_hidden_state
        out[:, 0].sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert sorted(grads[0]) == sorted(grads[1]) and len(grads[0]) > 20
    for n, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][n], rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precisions_and_the_triton_interpreter(dtype, device):
    """fp32 / bf16 on the CPU path and fp32 through the Triton kernels against the float64 truth: the same
    kept indices (fp32) and outputs within the dtype's tolerance."""
    reference = _model("vit", heads=3)  # head dim 16, the kernels' smallest
    mask = _masks(3, 1, seed=4)
    pixels = torch.randn(3, 3, 20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    pruneattn.patch(reference, keep_rate=0.6, layers=[1, 2])
    with torch.no_grad(), pruneattn.use_backend("cpu"):
        want = reference(pixels, attention_mask=mask).last_hidden_state
    want_kept = pruneattn.kept_indices(reference)[2]
    backends = ["cpu", "triton"] if dtype == torch.float32 else ["cpu"]
    for backend in backends:
        model = _model("vit", heads=3, dtype=dtype)
        pruneattn.patch(model, keep_rate=0.6, layers=[1, 2])
        at = device if backend == "triton" else torch.device("cpu")
        with torch.no_grad(), pruneattn.use_backend(backend):
            out = model.to(at)(pixels.to(at, dtype), attention_mask=mask.to(at)).last_hidden_state
        kept = pruneattn.kept_indices(model)[2].cpu()
        if dtype == torch.float32:
            assert torch.equal(kept, want_kept), backend
            torch.testing.assert_close(out.cpu().double(), want, rtol=1e-4, atol=1e-4)
        else:  # bf16 may rank near-ties differently: compare the rows that kept the same patches
            same = (kept == want_kept).all(dim=1)
            assert same.any()
            torch.testing.assert_close(out.cpu().double()[same], want[same], rtol=0.1, atol=0.1)


@pytest.mark.parametrize("cls_name", ["Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification"])
def test_classifiers_that_average_all_tokens_refuse_unequal_masks(cls_name, cpu_backend):
    """Their head averages every output token: with images keeping different numbers of patches the
    padding slots would enter the average, so such a mask is refused while a block prunes; equal counts,
    keep 1.0 and the encoder patched on its own work."""
    config = T.Dinov2Config if cls_name.startswith("Dinov2For") else T.Dinov2WithRegistersConfig
    torch.manual_seed(0)
    model = getattr(T, cls_name)(config(**SMALL, num_attention_heads=3, num_labels=4)).eval()
    prefix = 1 + getattr(model.config, "num_register_tokens", 0)
    pixels = torch.randn(2, 3, 20, 20)
    unequal = torch.ones(2, prefix + 25, dtype=torch.long)
    unequal[1, -3:] = 0
    equal = unequal.clone()
    equal[0, prefix : prefix + 3] = 0
    pruneattn.patch(model, keep_rate=0.5)
    with torch.no_grad():
        with pytest.raises(ValueError, match=f"{cls_name} averages every output token"):
            model(pixels, attention_mask=unequal)
        assert model(pixels, attention_mask=equal).logits.shape == (2, 4)
        pruneattn.patch(model, keep_rate=1.0)
        assert model(pixels, attention_mask=unequal).logits.shape == (2, 4)
        encoder = model.dinov2 if prefix == 1 else model.dinov2_with_registers
        pruneattn.unpatch(model)
        pruneattn.patch(encoder, keep_rate=0.5, layers=[1])
        out = encoder(pixels, attention_mask=unequal).last_hidden_state
    assert out.shape[1] == prefix + 13 and (pruneattn.kept_indices(encoder)[1][1] == -1).sum() == 13 - 11
